//! A device's I/O thread: waits on its queues' notification eventfds (which KVM signals
//! through ioeventfd, off the vCPU threads) and runs the device's handler for each.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Lets a handler stop and resume watching the host descriptor (`spawn_with_fd`), say while
/// the guest has no buffer to put its data in.
pub struct Watch<'a> {
    epoll: &'a Epoll,
    fd: Option<(RawFd, u64)>,
}

impl Watch<'_> {
    pub fn host_fd(&self, readable: bool) {
        if let Some((fd, token)) = self.fd {
            let events = if readable { EventSet::IN } else { EventSet::empty() };
            let _ = self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token));
        }
    }
}

impl Worker {
    /// Runs `handle(i)` on a new thread each time `events[i]` fires: the queues' notification
    /// eventfds, and any of the device's own (say, host input ready).
    pub fn spawn<F>(name: String, events: Vec<EventFd>, mut handle: F) -> io::Result<Worker>
    where
        F: FnMut(usize) + Send + 'static,
    {
        Self::start(name, events, None, move |i, _| handle(i))
    }

    /// Like `spawn`, plus a host descriptor (a socket or tap) reported as index
    /// `events.len()` while readable; the handler reads it itself.
    pub fn spawn_with_fd<F>(name: String, events: Vec<EventFd>, fd: RawFd, handle: F) -> io::Result<Worker>
    where
        F: FnMut(usize, &Watch) + Send + 'static,
    {
        Self::start(name, events, Some(fd), handle)
    }

    fn start<F>(name: String, events: Vec<EventFd>, fd: Option<RawFd>, mut handle: F) -> io::Result<Worker>
    where
        F: FnMut(usize, &Watch) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let fd_token = events.len() as u64;
        let stop_token = fd_token + 1;
        for (i, evt) in events.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        if let Some(fd) = fd {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd_token))?;
        }
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, stop_token))?;
        let stop_clone = stop.try_clone()?;
        let thread = crate::thread::spawn(crate::thread::ThreadKind::Device, name, move || {
            let _stop = stop_clone;
            let watch = Watch { epoll: &epoll, fd: fd.map(|fd| (fd, fd_token)) };
            let mut ready = vec![EpollEvent::default(); events.len() + 2];
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
                    if let Some(evt) = events.get(token as usize) {
                        let _ = evt.read();
                    }
                    handle(token as usize, &watch);
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

    #[test]
    fn host_fd_is_reported_until_unwatched() {
        let host = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        host.write(1).unwrap(); // stays readable: the handler does not drain it
        let (tx, rx) = channel();
        let _worker = Worker::spawn_with_fd("test".into(), vec![], host.as_raw_fd(), move |i, watch| {
            tx.send(i).unwrap();
            watch.host_fd(false);
        })
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "unwatched descriptor still reported");
    }
}
