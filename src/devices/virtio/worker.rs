//! A device's I/O thread: waits on its queues' notification eventfds (which KVM signals
//! through ioeventfd, off the vCPU threads) and runs the device's handler for each.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::thread::{DeviceIo, ThreadKind};

/// A device's I/O thread. While it runs it owns the device's queue state `S`; pausing or
/// stopping it hands the state back (so the device can resume, or be saved), and notifications
/// that arrive meanwhile wait in their eventfds.
pub struct Worker<S: Send + 'static> {
    io: DeviceIo,
    name: String,
    /// Host descriptors watched besides the eventfds (a socket or tap, completions, a rate
    /// limiter's timer), reported as indices `events.len()` on.
    fds: Vec<RawFd>,
    handle: Handler<S>,
    /// Run on the thread when it is told to stop, before it hands the state back.
    quiesce: Option<fn(&mut S)>,
    run: Run<S>,
}

/// What a worker does with one event: `S` is its state, the index says which eventfd fired
/// (or `events.len() + i` for host descriptor `i`).
pub type Handler<S> = fn(&mut S, usize, &Watch);

enum Run<S> {
    Running {
        stop: EventFd,
        thread: JoinHandle<(S, Vec<EventFd>)>,
    },
    Parked {
        state: S,
        events: Vec<EventFd>,
    },
    /// The thread died (a panic): its state is lost.
    Lost,
}

/// Lets a handler stop and resume watching the (first) host descriptor, say while the guest
/// has no buffer to put its data in.
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

/// Pause and resume, whatever a worker's state type.
pub trait Lifecycle: Send {
    fn pause(&mut self);
    fn resume(&mut self) -> io::Result<()>;
}

impl<S: Send + 'static> Worker<S> {
    /// Runs `handle(state, i)` on a new thread each time `events[i]` fires: the queues'
    /// notification eventfds, and any of the device's own (say, host input ready).
    pub fn spawn(io: DeviceIo, name: String, events: Vec<EventFd>, state: S, handle: Handler<S>) -> io::Result<Self> {
        Self::spawn_with_fds(io, name, events, Vec::new(), state, handle, None)
    }

    /// Like `spawn`, plus a host descriptor (a socket or tap) reported as index
    /// `events.len()` while readable; the handler reads it itself.
    pub fn spawn_with_fd(
        io: DeviceIo,
        name: String,
        events: Vec<EventFd>,
        fd: RawFd,
        state: S,
        handle: Handler<S>,
    ) -> io::Result<Self> {
        Self::spawn_with_fds(io, name, events, vec![fd], state, handle, None)
    }

    /// The general form: any number of host descriptors, and an optional `quiesce` run on the
    /// state whenever the thread stops (pause, reset, drop), so work the device has in flight
    /// is finished before anyone sees the state.
    pub fn spawn_with_fds(
        io: DeviceIo,
        name: String,
        events: Vec<EventFd>,
        fds: Vec<RawFd>,
        state: S,
        handle: Handler<S>,
        quiesce: Option<fn(&mut S)>,
    ) -> io::Result<Self> {
        let mut worker = Worker { io, name, fds, handle, quiesce, run: Run::Parked { state, events } };
        worker.resume()?;
        Ok(worker)
    }

    /// Stops the thread and hands back the state; `None` if the thread died.
    pub fn stop(mut self) -> Option<S> {
        self.pause();
        match std::mem::replace(&mut self.run, Run::Lost) {
            Run::Parked { state, .. } => Some(state),
            _ => None,
        }
    }

    fn start(&self, mut state: S, events: Vec<EventFd>) -> io::Result<Run<S>> {
        let stop = crate::host::eventfd()?;
        let epoll = Epoll::new()?;
        let fd_token = events.len() as u64;
        let stop_token = fd_token + self.fds.len() as u64;
        for (i, evt) in events.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        for (token, fd) in (fd_token..).zip(&self.fds) {
            epoll.ctl(ControlOperation::Add, *fd, EpollEvent::new(EventSet::IN, token))?;
        }
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, stop_token))?;
        let (fd, handle, quiesce) = (self.fds.first().copied(), self.handle, self.quiesce);
        // The thread holds the stop eventfd too: closing the last descriptor of a file takes it
        // out of every epoll set, so a worker dropped without waiting would never see its stop.
        let stop_held = stop.try_clone()?;
        let thread = crate::thread::spawn(ThreadKind::Device(self.io), self.name.clone(), move || {
            let _stop = stop_held;
            let watch = Watch { epoll: &epoll, fd: fd.map(|fd| (fd, fd_token)) };
            let mut ready = vec![EpollEvent::default(); stop_token as usize + 1];
            loop {
                let n = match epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("device worker epoll: {e}");
                        quiesce.inspect(|q| q(&mut state));
                        return (state, events);
                    }
                };
                for event in &ready[..n] {
                    let token = event.data();
                    if token == stop_token {
                        quiesce.inspect(|q| q(&mut state));
                        return (state, events);
                    }
                    if let Some(evt) = events.get(token as usize) {
                        let _ = evt.read();
                    }
                    handle(&mut state, token as usize, &watch);
                }
            }
        })?;
        Ok(Run::Running { stop, thread })
    }
}

impl<S: Send + 'static> Lifecycle for Worker<S> {
    /// Stops the thread, keeping its state and eventfds; a no-op unless running.
    fn pause(&mut self) {
        if let Run::Running { stop, thread } = std::mem::replace(&mut self.run, Run::Lost) {
            let _ = stop.write(1);
            if let Ok((state, events)) = thread.join() {
                self.run = Run::Parked { state, events };
            }
        }
    }

    /// Starts a new thread on the kept state; a no-op unless paused.
    fn resume(&mut self) -> io::Result<()> {
        if let Run::Parked { state, events } = std::mem::replace(&mut self.run, Run::Lost) {
            self.run = self.start(state, events)?;
        }
        Ok(())
    }
}

impl<S: Send + 'static> Drop for Worker<S> {
    /// Tells the thread to stop and does not wait for it: a thread blocked on the host (a FIFO,
    /// a hung file system) ends once that call returns, and no one waits meanwhile. `pause` and
    /// `stop` wait, for they take the state back.
    fn drop(&mut self) {
        if let Run::Running { stop, .. } = &self.run {
            let _ = stop.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Sender};
    use std::time::Duration;

    #[test]
    fn runs_the_handler_per_kicked_queue_and_stops_on_drop() {
        let kicks: Vec<EventFd> = (0..2).map(|_| crate::host::eventfd().unwrap()).collect();
        let second = kicks[1].try_clone().unwrap();
        let (tx, rx) = channel();
        let worker = Worker::spawn(DeviceIo::Memory, "test".into(), kicks, tx, |tx, q, _| tx.send(q).unwrap()).unwrap();
        second.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        drop(worker);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }

    #[test]
    fn paused_workers_keep_state_and_notifications_for_resume() {
        let kick = crate::host::eventfd().unwrap();
        let poke = kick.try_clone().unwrap();
        let (tx, rx) = channel();
        let count = |(tx, n): &mut (Sender<u32>, u32), _: usize, _: &Watch| {
            *n += 1;
            tx.send(*n).unwrap();
        };
        let mut worker = Worker::spawn(DeviceIo::Memory, "test".into(), vec![kick], (tx, 0), count).unwrap();
        poke.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        worker.pause();
        poke.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "a paused worker handled a notification");
        worker.resume().unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2, "state kept, notification not lost");
        let (_, handled) = worker.stop().unwrap();
        assert_eq!(handled, 2);
    }

    #[test]
    fn dropping_a_worker_blocked_on_the_host_does_not_wait_for_it() {
        let kick = crate::host::eventfd().unwrap();
        let poke = kick.try_clone().unwrap();
        let (blocked_tx, blocked_rx) = channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let state = (blocked_tx, Some(release_rx));
        let worker = Worker::spawn(DeviceIo::Memory, "test".into(), vec![kick], state, |(blocked, release), _, _| {
            blocked.send(()).unwrap();
            // A host call that does not return until the test says so.
            let _ = release.take().unwrap().recv();
        })
        .unwrap();
        poke.write(1).unwrap();
        blocked_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let (dropped_tx, dropped_rx) = channel();
        std::thread::spawn(move || {
            drop(worker);
            dropped_tx.send(()).unwrap();
        });
        assert!(dropped_rx.recv_timeout(Duration::from_secs(5)).is_ok(), "dropping waited for the blocked thread");
        // Released, the thread sees its stop and ends: it serves the queue no more.
        drop(release_tx);
        std::thread::sleep(Duration::from_millis(200));
        poke.write(1).unwrap();
        assert!(blocked_rx.recv_timeout(Duration::from_millis(500)).is_err(), "a dropped worker served a notification");
    }

    #[test]
    fn host_fd_is_reported_until_unwatched() {
        let host = crate::host::eventfd().unwrap();
        host.write(1).unwrap(); // stays readable: the handler does not drain it
        let (tx, rx) = channel();
        let _worker =
            Worker::spawn_with_fd(DeviceIo::Sockets, "test".into(), vec![], host.as_raw_fd(), tx, |tx, i, watch| {
                tx.send(i).unwrap();
                watch.host_fd(false);
            })
            .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "unwatched descriptor still reported");
    }
}
