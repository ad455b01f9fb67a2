//! virtio-9p: a host directory the guest mounts with `mount -t 9p -o trans=virtio TAG DIR`.
//! Each request is one 9P T-message in the driver-readable buffers, answered with one
//! R-message in the writable ones; `crate::share` serves and confines them.

use std::io::Read;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::worker::{Lifecycle, Worker};
use super::*;
use crate::devices::state::{StateError, Versioned};
use crate::share::{Session, Share, MAX_MESSAGE_SIZE};
use crate::thread::DeviceIo;

const QUEUE_SIZES: &[u16] = &[256];
/// The device's config space carries the mount tag.
const VIRTIO_9P_MOUNT_TAG: u64 = 1 << 0;

/// The guest's 9P session, if it had attached.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct P9State {
    pub session: Option<Session>,
}

impl Versioned for P9State {
    const KIND: &'static str = "virtio-9p";
    const VERSION: u16 = 1;
}

pub struct P9 {
    /// Config space: tag length (le16), then the tag.
    config: Vec<u8>,
    /// Outlives the worker: a reset stops serving, the next Tversion starts a new session.
    share: Arc<Mutex<Share>>,
    worker: Option<Worker<ShareQueue>>,
}

/// What the worker serves: the request queue, and the share the requests go to.
type ShareQueue = (Queue, GuestMemoryMmap, Arc<dyn Interrupt>, Arc<Mutex<Share>>);

impl P9 {
    pub fn new(share: Share, tag: &str) -> P9 {
        let len = u16::try_from(tag.len()).expect("ShareSpec bounds the tag length");
        let mut config = len.to_le_bytes().to_vec();
        config.extend_from_slice(tag.as_bytes());
        P9 { config, share: Arc::new(Mutex::new(share)), worker: None }
    }
}

/// Answers every available request; a message longer than the negotiated maximum is cut
/// there and so fails to decode, which the server answers with an error.
pub fn process_queue(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt, share: &Mutex<Share>) {
    let mut request = Vec::with_capacity(64 * 1024);
    serve_queue(queue, mem, interrupt, 0, |chain| {
        let (Ok(reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
            return 0;
        };
        request.clear();
        if reader.take(u64::from(MAX_MESSAGE_SIZE)).read_to_end(&mut request).is_err() {
            return 0;
        }
        if let Err(e) = share.lock().unwrap().handle(&mut request, &mut writer) {
            tracing::debug!("virtio-9p: request not answered: {e}");
        }
        writer.bytes_written() as u32
    });
}

impl VirtioDevice for P9 {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_9P
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES | VIRTIO_9P_MOUNT_TAG
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, Activation { mem, interrupt, queues, .. }: Activation) -> Result<(), ActivateError> {
        let [ActiveQueue { queue, kick }] = expect_queues(queues)?;
        let state = (queue, mem, interrupt, self.share.clone());
        self.worker = Some(Worker::spawn(
            DeviceIo::Files,
            "virtio-9p".into(),
            vec![kick],
            state,
            |(queue, mem, interrupt, share), _, _| process_queue(queue, mem, &**interrupt, share),
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn workers(&mut self) -> Vec<&mut dyn Lifecycle> {
        self.worker.iter_mut().map(|w| w as &mut dyn Lifecycle).collect()
    }

    /// The guest's fids by path: host descriptors do not survive into another process.
    fn save(&mut self) -> Vec<u8> {
        crate::devices::state::encode(&P9State { session: self.share.lock().unwrap().session() })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), StateError> {
        let P9State { session } = crate::devices::state::decode(state)?;
        if let Some(session) = session {
            self.share.lock().unwrap().resume_session(&session);
        }
        Ok(())
    }
}
