//! The control socket server: accepts keel-agent's connections on the Unix socket, parses the
//! protocol of [`crate::control`] and hands what changes services to the main loop as
//! [`Command`]s (waking it through a pipe). Log requests are answered here, from the log files,
//! so a slow reader never holds up supervision. It never signals a process itself.

use super::log;
use super::logfile::log_path;
use crate::control::{encode, Op, Request, Response, ServiceStatus, MAX_LINE, PROTOCOL_VERSION};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::Duration;

/// How the node is to go down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    Reboot,
    PowerOff,
}

/// What a reload did, in words, and the names whose logs can be asked for after it.
pub type Reloaded = (Vec<String>, Vec<String>);

/// A request for the main loop.
#[derive(Debug)]
pub enum Command {
    List(SyncSender<Vec<ServiceStatus>>),
    Restart(String, SyncSender<Result<(), String>>),
    /// Reply: what was done, and the names whose logs can be asked for now.
    Reload(Vec<String>, SyncSender<Result<Reloaded, String>>),
    Shutdown(ShutdownKind),
}

/// The default tail of a log request.
const DEFAULT_TAIL: u64 = 64 * 1024;

/// What the connection threads share.
#[derive(Debug)]
struct Shared {
    commands: Sender<Command>,
    wake: OwnedFd,
    /// The services (and keel-init) whose logs can be asked for; a reload changes them.
    names: std::sync::Mutex<Vec<String>>,
    log_dir: PathBuf,
}

impl Shared {
    fn send(&self, c: Command) -> bool {
        if self.commands.send(c).is_err() {
            return false;
        }
        let _ = nix::unistd::write(&self.wake, &[1u8]);
        true
    }
}

/// The listening socket and the receiving end of its commands.
#[derive(Debug)]
pub struct Server {
    pub commands: Receiver<Command>,
    /// Readable when commands are waiting; drain it with [`Server::drain_wake`].
    pub wake: OwnedFd,
    path: PathBuf,
}

impl Server {
    /// Listen on `path` (its directory is created with mode 0700; a stale socket is replaced)
    /// and serve in background threads.
    pub fn start(path: &Path, names: Vec<String>, log_dir: PathBuf) -> std::io::Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (wr, ww) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        let shared = Arc::new(Shared {
            commands: tx,
            wake: ww,
            names: std::sync::Mutex::new(names),
            log_dir,
        });
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, shared))?;
        Ok(Server {
            commands: rx,
            wake: wr,
            path: path.to_path_buf(),
        })
    }

    pub fn drain_wake(&self) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.wake, &mut buf), Ok(n) if n > 0) {}
    }

    /// Stop accepting new connections (the socket file is removed).
    pub fn close(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream, &shared) {
                            if e.kind() != std::io::ErrorKind::BrokenPipe {
                                log(format!("control connection ended: {e}"));
                            }
                        }
                    });
                if let Err(e) = spawned {
                    log(format!("cannot serve a control connection: {e}"));
                }
            }
            Err(e) => {
                log(format!("control socket accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn reply(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    w.write_all(&encode(r))
}

fn error(w: &mut UnixStream, message: String) -> std::io::Result<()> {
    reply(w, &Response::Error { message })
}

fn serve(stream: UnixStream, shared: &Shared) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            return error(
                &mut w,
                format!("request longer than {MAX_LINE} bytes; closing"),
            );
        }
        let req: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                // tell a client of another version which one this is
                let v = serde_json::from_slice::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("v").and_then(|v| v.as_u64()));
                match v {
                    Some(v) if v != u64::from(PROTOCOL_VERSION) => error(
                        &mut w,
                        format!(
                            "protocol version {v} is not supported; this keel-init speaks \
                             version {PROTOCOL_VERSION}"
                        ),
                    )?,
                    _ => error(&mut w, format!("cannot parse the request: {e}"))?,
                }
                continue;
            }
        };
        if req.v != PROTOCOL_VERSION {
            error(
                &mut w,
                format!(
                    "protocol version {} is not supported; this keel-init speaks version \
                     {PROTOCOL_VERSION}",
                    req.v
                ),
            )?;
            continue;
        }
        match req.op {
            Op::ListServices => {
                let (tx, rx) = sync_channel(1);
                let r = if shared.send(Command::List(tx)) {
                    rx.recv().ok()
                } else {
                    None
                };
                match r {
                    Some(services) => reply(&mut w, &Response::Services { services })?,
                    None => error(&mut w, "keel-init is shutting down".into())?,
                }
            }
            Op::Restart { service } => match ask(shared, |tx| Command::Restart(service, tx)) {
                Ok(()) => reply(&mut w, &Response::Done)?,
                Err(e) => error(&mut w, e)?,
            },
            Op::Reload { services } => match ask(shared, |tx| Command::Reload(services, tx)) {
                Ok((changes, names)) => {
                    *shared.names.lock().unwrap_or_else(|e| e.into_inner()) = names;
                    reply(&mut w, &Response::Reloaded { changes })?
                }
                Err(e) => error(&mut w, e)?,
            },
            Op::Reboot | Op::PowerOff => {
                let kind = if req.op == Op::Reboot {
                    ShutdownKind::Reboot
                } else {
                    ShutdownKind::PowerOff
                };
                // answer first: the main loop stops everything, this connection included
                reply(&mut w, &Response::Done)?;
                shared.send(Command::Shutdown(kind));
            }
            Op::Logs {
                service,
                follow,
                tail_bytes,
            } => {
                let known = shared
                    .names
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&service);
                if !known {
                    error(&mut w, format!("there is no service {service:?}"))?;
                    continue;
                }
                let path = log_path(&shared.log_dir, &service);
                send_log(&mut w, &path, tail_bytes.unwrap_or(DEFAULT_TAIL), follow)?;
                if follow {
                    return Ok(());
                }
            }
        }
    }
}

/// Hand the main loop a command that answers with a result, and wait for the answer.
fn ask<T>(
    shared: &Shared,
    command: impl FnOnce(SyncSender<Result<T, String>>) -> Command,
) -> Result<T, String> {
    let down = || "keel-init is shutting down".to_string();
    let (tx, rx) = sync_channel(1);
    if !shared.send(command(tx)) {
        return Err(down());
    }
    rx.recv().unwrap_or_else(|_| Err(down()))
}

fn send_chunk(w: &mut UnixStream, data: &[u8]) -> std::io::Result<()> {
    for part in data.chunks(16 * 1024) {
        reply(
            w,
            &Response::Log {
                data: String::from_utf8_lossy(part).into_owned(),
            },
        )?;
    }
    Ok(())
}

/// Send the tail of a log; when following, keep sending what is appended (across rotations)
/// until the client hangs up.
fn send_log(w: &mut UnixStream, path: &Path, tail: u64, follow: bool) -> std::io::Result<()> {
    let mut file = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return error(w, format!("cannot read {}: {e}", path.display())),
    };
    if let Some(f) = file.as_mut() {
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(tail)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        send_chunk(w, &buf)?;
    }
    if !follow {
        return reply(w, &Response::Done);
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // wait for the client to hang up, or for 200 ms
        let mut fds = [PollFd::new(w.as_fd(), PollFlags::POLLIN)];
        let hung_up = match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(n) if n > 0 => {
                let mut b = [0u8; 256];
                matches!((&*w).read(&mut b), Ok(0) | Err(_))
            }
            _ => false,
        };
        if hung_up {
            return Ok(());
        }
        if let Some(f) = file.as_mut() {
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                send_chunk(w, &buf[..n])?;
            }
        }
        // a rotation replaced the file: continue with the new one from its start
        let current = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let open = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current != open {
            // what was appended to the old file before the rename, then the new file
            if let Some(f) = file.as_mut() {
                let mut rest = Vec::new();
                f.read_to_end(&mut rest)?;
                send_chunk(w, &rest)?;
            }
            file = File::open(path).ok();
        }
    }
}
