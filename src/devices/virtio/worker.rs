//! A device's I/O thread: waits on its queues' notification eventfds (which KVM signals
//! through ioeventfd, off the vCPU threads) and runs the device's handler for each.

use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `handle(i)` on a new thread each time `events[i]` fires: the queues' notification
    /// eventfds, and any of the device's own (say, host input ready).
    pub fn spawn<F>(name: String, events: Vec<EventFd>, mut handle: F) -> io::Result<Worker>
    where
        F: FnMut(usize) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let stop_token = events.len() as u64;
        for (i, evt) in events.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, stop_token))?;
        let stop_clone = stop.try_clone()?;
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let _stop = stop_clone;
            let mut ready = vec![EpollEvent::default(); events.len() + 1];
            loop {
                let n = match epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("device worker epoll: {e}");
                        return;
                    }
                };
                for event in &ready[..n] {
                    let token = event.data();
                    if token == stop_token {
                        return;
                    }
                    let _ = events[token as usize].read();
                    handle(token as usize);
                }
            }
        })?;
        Ok(Worker { stop, thread: Some(thread) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn runs_the_handler_per_kicked_queue_and_stops_on_drop() {
        let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let second = kicks[1].try_clone().unwrap();
        let (tx, rx) = channel();
        let worker = Worker::spawn("test".into(), kicks, move |q| tx.send(q).unwrap()).unwrap();
        second.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        drop(worker);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
