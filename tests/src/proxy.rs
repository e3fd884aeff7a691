//! A TCP proxy for one directed link between two nodes, used to inject network faults.
//!
//! Node A's connection string for node B points at the proxy of link A→B, which forwards to
//! B. The proxy can be cut (a black hole: bytes are read and dropped, nothing is refused, so
//! the sender notices only by timeouts, as in a real partition), healed (connections that
//! lived through the cut are closed, new ones are forwarded), and delayed (every chunk is
//! delivered that much later; order is kept).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Up,
    Cut,
}

struct Shared {
    state: Mutex<LinkState>,
    /// Incremented by every cut; a connection older than the current epoch lived through one.
    epoch: AtomicU64,
    delay_ms: AtomicU64,
    /// Each chunk waits up to this much more, at random (order is kept).
    jitter_ms: AtomicU64,
    stop: AtomicBool,
    /// Both sockets of every open connection, with the epoch it was opened in.
    conns: Mutex<Vec<(u64, TcpStream, Option<TcpStream>)>>,
}

pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `127.0.0.1:port` and forwards to `target`.
    pub fn start(port: u16, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(LinkState::Up),
            epoch: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            jitter_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept =
            thread::Builder::new().name(format!("proxy-{port}")).spawn(move || accept_loop(listener, target, s))?;
        Ok(Proxy { port, shared, accept: Some(accept) })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Black-holes the link: nothing sent either way on it arrives until [`Proxy::heal`].
    pub fn cut(&self) {
        let mut state = self.shared.state.lock();
        *state = LinkState::Cut;
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Restores the link. Connections that lived through the cut lost bytes, so they are closed.
    pub fn heal(&self) {
        let mut state = self.shared.state.lock();
        *state = LinkState::Up;
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        let mut conns = self.shared.conns.lock();
        conns.retain(|(born, client, server)| {
            if *born < epoch {
                let _ = client.shutdown(Shutdown::Both);
                if let Some(server) = server {
                    let _ = server.shutdown(Shutdown::Both);
                }
                false
            } else {
                true
            }
        });
    }

    /// Delivers every chunk `delay` later than it was sent (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.set_delay_jitter(delay, Duration::ZERO);
    }

    /// Delivers every chunk `delay` plus up to `jitter` (uniformly at random) later than it was
    /// sent; a chunk is never delivered before the one sent ahead of it.
    pub fn set_delay_jitter(&self, delay: Duration, jitter: Duration) {
        self.shared.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
        self.shared.jitter_ms.store(jitter.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for (_, client, server) in self.shared.conns.lock().drain(..) {
            let _ = client.shutdown(Shutdown::Both);
            if let Some(server) = server {
                let _ = server.shutdown(Shutdown::Both);
            }
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let s = shared.clone();
                thread::spawn(move || serve(client, target, s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn serve(client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    let epoch = shared.epoch.load(Ordering::SeqCst);
    let cut = *shared.state.lock() == LinkState::Cut;
    let server = if cut {
        None
    } else {
        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(server) => Some(server),
            Err(_) => return, // target down: the client sees the connection closed, like a refusal
        }
    };
    let (Ok(client_r), Some(server_pair)) = (client.try_clone(), server.as_ref().map(|s| s.try_clone())) else {
        // Accepted during a cut: swallow whatever arrives until the connection is closed.
        if let Ok(c) = client.try_clone() {
            shared.conns.lock().push((epoch, c, None));
        }
        drain(client, &shared);
        return;
    };
    let Ok(server_r) = server_pair else { return };
    let server = server.expect("server connected");
    let _ = server.set_nodelay(true);
    if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
        shared.conns.lock().push((epoch, c, Some(s)));
    }
    let s2 = shared.clone();
    let up = thread::spawn(move || pump(client_r, server, epoch, s2));
    pump(server_r, client, epoch, shared);
    let _ = up.join();
}

fn drain(mut from: TcpStream, shared: &Shared) {
    let mut buf = [0u8; 16 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Copies `from` to `to` through a delivery thread that applies the link's delay.
fn pump(mut from: TcpStream, to: TcpStream, born: u64, shared: Arc<Shared>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut to_w = match to.try_clone() {
        Ok(t) => t,
        Err(_) => return,
    };
    let writer = thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to_w.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to_w.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut next = crate::random(Instant::now().elapsed().as_nanos() as u64 ^ born.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let state = *shared.state.lock();
        if state == LinkState::Cut {
            continue; // black hole
        }
        if born < shared.epoch.load(Ordering::SeqCst) {
            break; // lived through a cut: its stream is broken
        }
        let jitter = shared.jitter_ms.load(Ordering::SeqCst);
        let extra = if jitter == 0 { 0 } else { next(jitter + 1) };
        let delay = Duration::from_millis(shared.delay_ms.load(Ordering::SeqCst) + extra);
        if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
