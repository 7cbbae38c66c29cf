//! QMP client: commands typed by the `qapi` crate, over our own JSON-lines transport.
//!
//! Why not `qapi`'s own `Qmp` (sync) or its tokio client:
//! * Its sync `Qmp` is one blocking object: events are only read while a command waits for its
//!   reply, so nothing sees a `SHUTDOWN` while the VM just runs, and QEMU's output queue grows
//!   with every event nobody reads. We need events read all the time and commands sent from other
//!   threads (a signal handler's `powerdown` while the main thread waits for the VM).
//! * Its `Event` enum is generated from one QEMU schema (9.1 for qapi 0.15) with no catch-all: any
//!   event that QEMU version does not have fails the *command* whose reply was being read.
//! * No timeouts, no command ids, no file-descriptor passing (`getfd`, used to hand QEMU the
//!   state file for save/restore without `exec:` shell commands).
//! * The async client needs a tokio runtime in a CLI that is otherwise synchronous.
//!
//! So: one reader thread owns the socket's read side, files events (kept as raw JSON, so unknown
//! ones are fine) and hands replies to the waiting command by id; commands are serialised with
//! `qapi::Execute` from the generated types (names and arguments checked at compile time), and
//! replies decoded into their typed result or left as JSON where a newer schema is stricter than
//! the QEMU we talk to.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Events kept for [`QmpClient::events`]; older ones are dropped.
const EVENT_LOG_CAPACITY: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("the connection to QEMU was closed")]
    Disconnected,
    #[error("{command}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU did not answer {command} within {:.1} s", .timeout.as_secs_f64())]
    Timeout { command: String, timeout: Duration },
    #[error("unexpected reply to {command}: {error}")]
    Decode { command: String, error: String },
    #[error("not a QMP server: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// An asynchronous event from QEMU, as sent.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

/// The `SHUTDOWN` event: QEMU is about to stop running the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownEvent {
    /// The guest asked for it (ACPI poweroff, also when answering an ACPI power button press).
    pub guest: bool,
    /// QEMU's `ShutdownCause`: `guest-shutdown`, `host-qmp-quit`, `host-signal`, ...
    pub reason: String,
}

/// QEMU's version from the QMP greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

struct Reply {
    id: Option<u64>,
    result: Result<Value, (String, String)>,
}

#[derive(Default)]
struct EventState {
    log: VecDeque<QmpEvent>,
    shutdown: Option<ShutdownEvent>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<EventState>,
    changed: Condvar,
}

struct Channel {
    stream: UnixStream,
    replies: Receiver<Reply>,
    next_id: u64,
}

/// A QMP connection. All methods take `&self` and may be called from several threads; commands
/// are sent one at a time.
pub struct QmpClient {
    channel: Mutex<Channel>,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
    version: QemuVersion,
    timeout: Duration,
}

impl QmpClient {
    /// Reads the greeting, leaves capabilities-negotiation mode and starts the reader thread.
    /// Commands time out after `timeout`.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let greeting = read_message(&mut reader)?.ok_or(QmpError::Disconnected)?;
        let version = greeting
            .pointer("/QMP/version/qemu")
            .and_then(|v| {
                Some(QemuVersion {
                    major: v.get("major")?.as_u64()? as u32,
                    minor: v.get("minor")?.as_u64()? as u32,
                    micro: v.get("micro")?.as_u64()? as u32,
                })
            })
            .ok_or_else(|| QmpError::Protocol(format!("unexpected greeting {greeting}")))?;
        (&stream).write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        let reply = read_message(&mut reader)?.ok_or(QmpError::Disconnected)?;
        if reply.get("return").is_none() {
            return Err(QmpError::Protocol(format!("qmp_capabilities: {reply}")));
        }
        // From here on the reader thread waits for as long as QEMU runs.
        stream.set_read_timeout(None)?;

        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("qmp-reader".into())
                .spawn(move || read_loop(reader, tx, &shared))?
        };
        Ok(QmpClient {
            channel: Mutex::new(Channel {
                stream,
                replies: rx,
                next_id: 1,
            }),
            shared,
            reader: Mutex::new(Some(reader)),
            version,
            timeout,
        })
    }

    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// How long a command waits for its reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `command` and decodes its typed result.
    pub fn execute<C: qapi::Command>(&self, command: &C) -> Result<C::Ok, QmpError> {
        let value = self.execute_value(command)?;
        decode(C::NAME, value)
    }

    /// Runs `command` and returns its result as JSON (for results whose generated type is
    /// stricter than what older QEMUs send).
    pub fn execute_value<C: qapi::Command>(&self, command: &C) -> Result<Value, QmpError> {
        self.run(command, None)
    }

    /// Runs `command` with `fd` attached to it (for `getfd`).
    pub fn execute_with_fd<C: qapi::Command>(&self, command: &C, fd: BorrowedFd<'_>) -> Result<C::Ok, QmpError> {
        let value = self.run(command, Some(fd))?;
        decode(C::NAME, value)
    }

    fn run<C: qapi::Command>(&self, command: &C, fd: Option<BorrowedFd<'_>>) -> Result<Value, QmpError> {
        let mut channel = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let id = channel.next_id;
        channel.next_id += 1;
        let mut line = serde_json::to_vec(&qapi::Execute::new(command, Some(id))).map_err(|e| QmpError::Decode {
            command: C::NAME.into(),
            error: e.to_string(),
        })?;
        line.push(b'\n');
        let sent = match fd {
            Some(fd) => crate::sys::send_with_fd(&channel.stream, &line, fd),
            None => (&channel.stream).write_all(&line),
        };
        if let Err(e) = sent {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => QmpError::Disconnected,
                _ => QmpError::Io(e),
            });
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match channel.replies.recv_timeout(left) {
                // A reply to an earlier command that timed out: skip it.
                Ok(reply) if reply.id != Some(id) => continue,
                Ok(reply) => {
                    return reply.result.map_err(|(class, desc)| QmpError::Command {
                        command: C::NAME.into(),
                        class,
                        desc,
                    })
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(QmpError::Timeout {
                        command: C::NAME.into(),
                        timeout: self.timeout,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(QmpError::Disconnected),
            }
        }
    }

    /// The events received so far (the last 256).
    pub fn events(&self) -> Vec<QmpEvent> {
        self.lock_state().log.iter().cloned().collect()
    }

    /// The last `SHUTDOWN` event, if any.
    pub fn shutdown_event(&self) -> Option<ShutdownEvent> {
        self.lock_state().shutdown.clone()
    }

    /// Waits until QEMU closed the connection (every event it sent has been read), at most
    /// `timeout`. True if it did.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock_state();
        while !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub fn is_closed(&self) -> bool {
        self.lock_state().closed
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, EventState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // --- the operations the VM lifecycle uses ---------------------------------------------

    /// ACPI power button (`system_powerdown`): the guest decides to shut down.
    pub fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute(&qapi::qmp::system_powerdown {}).map(drop)
    }

    /// Hard power-off (`quit`): QEMU exits at once. A connection closed before the reply
    /// arrived means it worked.
    pub fn quit(&self) -> Result<(), QmpError> {
        match self.execute(&qapi::qmp::quit {}) {
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Pauses the vCPUs (`stop`).
    pub fn stop(&self) -> Result<(), QmpError> {
        self.execute(&qapi::qmp::stop {}).map(drop)
    }

    /// Resumes the vCPUs (`cont`).
    pub fn cont(&self) -> Result<(), QmpError> {
        self.execute(&qapi::qmp::cont {}).map(drop)
    }

    /// `query-status`: QEMU's run state (`running`, `paused`, `prelaunch`, `inmigrate`,
    /// `postmigrate`, `shutdown`, ...).
    pub fn query_status(&self) -> Result<String, QmpError> {
        let value = self.execute_value(&qapi::qmp::query_status {})?;
        field_str(&value, "status", "query-status")
    }

    /// `query-migrate`: (status, error description). The status is `none` before any migration.
    pub fn query_migrate(&self) -> Result<(String, Option<String>), QmpError> {
        // Raw JSON: the generated MigrationInfo requires statistics fields older QEMUs omit.
        let value = self.execute_value(&qapi::qmp::query_migrate {})?;
        let status = value.get("status").and_then(Value::as_str).unwrap_or("none").to_owned();
        let error = value.get("error-desc").and_then(Value::as_str).map(str::to_owned);
        Ok((status, error))
    }

    /// Hands `fd` to QEMU under `name` (`getfd`), for `fd:<name>` migration URIs.
    pub fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd(&qapi::qmp::getfd { fdname: name.into() }, fd)
            .map(drop)
    }

    /// Starts saving the VM state to `uri` (`migrate`); poll [`Self::query_migrate`].
    pub fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        let command = qapi::qmp::migrate {
            uri: Some(uri.into()),
            channels: None,
            detach: None,
            resume: None,
        };
        self.execute(&command).map(drop)
    }

    /// Starts loading a VM state from `uri` in a QEMU started with `-incoming defer`.
    pub fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        let command = qapi::qmp::migrate_incoming {
            uri: Some(uri.into()),
            channels: None,
            exit_on_error: None,
        };
        self.execute(&command).map(drop)
    }

    /// Lifts the migration bandwidth limit (128 MiB/s by default): the state goes to a local
    /// file while the VM is paused, so the limit only makes saving slower.
    pub fn unlimit_migration_bandwidth(&self) -> Result<(), QmpError> {
        let parameters = qapi::qmp::MigrateSetParameters {
            max_bandwidth: Some(u64::MAX >> 4),
            ..Default::default()
        };
        self.execute(&qapi::qmp::migrate_set_parameters(parameters)).map(drop)
    }

    /// Sets the VNC password (`change-vnc-password`).
    pub fn change_vnc_password(&self, password: &str) -> Result<(), QmpError> {
        self.execute(&qapi::qmp::change_vnc_password {
            password: password.into(),
        })
        .map(drop)
    }

    /// The TCP port the VNC server listens on (`query-vnc`).
    pub fn vnc_port(&self) -> Result<u16, QmpError> {
        let value = self.execute_value(&qapi::qmp::query_vnc {})?;
        let service = field_str(&value, "service", "query-vnc")?;
        service.parse().map_err(|_| QmpError::Decode {
            command: "query-vnc".into(),
            error: format!("service {service:?} is not a port"),
        })
    }

    /// The host-side name of chardev `label` (`query-chardev`), e.g. `pty:/dev/pts/3`.
    pub fn chardev_filename(&self, label: &str) -> Result<Option<String>, QmpError> {
        let chardevs = self.execute(&qapi::qmp::query_chardev {})?;
        Ok(chardevs.into_iter().find(|c| c.label == label).map(|c| c.filename))
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        if let Ok(channel) = self.channel.get_mut() {
            let _ = channel.stream.shutdown(std::net::Shutdown::Both);
        }
        if let Some(reader) = self.reader.get_mut().ok().and_then(Option::take) {
            let _ = reader.join();
        }
    }
}

fn decode<T: DeserializeOwned>(command: &str, value: Value) -> Result<T, QmpError> {
    serde_json::from_value(value).map_err(|e| QmpError::Decode {
        command: command.into(),
        error: e.to_string(),
    })
}

fn field_str(value: &Value, field: &str, command: &str) -> Result<String, QmpError> {
    value
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| QmpError::Decode {
            command: command.into(),
            error: format!("no {field:?} in {value}"),
        })
}

fn read_message(reader: &mut impl BufRead) -> Result<Option<Value>, QmpError> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if line.trim().is_empty() {
            continue;
        }
        return serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| QmpError::Protocol(format!("{e}: {line:?}")));
    }
}

fn read_loop(mut reader: BufReader<UnixStream>, replies: Sender<Reply>, shared: &Shared) {
    loop {
        let message = match read_message(&mut reader) {
            Ok(Some(message)) => message,
            // A line that is not JSON: QEMU never sends one; skip rather than give up.
            Err(QmpError::Protocol(_)) => continue,
            Ok(None) | Err(_) => break,
        };
        if let Some(name) = message.get("event").and_then(Value::as_str) {
            let data = message.get("data").cloned().unwrap_or(Value::Null);
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if name == "SHUTDOWN" {
                state.shutdown = Some(ShutdownEvent {
                    guest: data.get("guest").and_then(Value::as_bool).unwrap_or(false),
                    reason: data.get("reason").and_then(Value::as_str).unwrap_or("").to_owned(),
                });
            }
            if state.log.len() == EVENT_LOG_CAPACITY {
                state.log.pop_front();
            }
            state.log.push_back(QmpEvent {
                name: name.to_owned(),
                data,
            });
            shared.changed.notify_all();
            continue;
        }
        let id = message.get("id").and_then(Value::as_u64);
        let result = if let Some(value) = message.get("return") {
            Ok(value.clone())
        } else if let Some(error) = message.get("error") {
            let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
            Err((text("class"), text("desc")))
        } else {
            continue;
        };
        // Nobody waiting (the command timed out and its caller left): drop it.
        let _ = replies.send(Reply { id, result });
    }
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    state.closed = true;
    shared.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A scripted QMP server on the other end of a socket pair: answers each command line with
    /// the next reply, after sending the events queued before it.
    fn fake_qemu(script: Vec<(&'static str, Vec<&'static str>)>) -> (UnixStream, std::thread::JoinHandle<Vec<Value>>) {
        let (client, server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut writer = server.try_clone().unwrap();
            writer
                .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n")
                .unwrap();
            let mut reader = BufReader::new(server);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"execute\":\"qmp_capabilities\"}\n");
            writer.write_all(b"{\"return\": {}}\r\n").unwrap();
            for (reply, events) in script {
                line.clear();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                let command: Value = serde_json::from_str(&line).unwrap();
                for event in events {
                    writer.write_all(event.as_bytes()).unwrap();
                    writer.write_all(b"\r\n").unwrap();
                }
                let id = command["id"].clone();
                let reply = reply.replace("ID", &id.to_string());
                writer.write_all(reply.as_bytes()).unwrap();
                writer.write_all(b"\r\n").unwrap();
                seen.push(command);
            }
            // Then hang up, like QEMU exiting.
            let mut rest = Vec::new();
            let _ = reader.get_mut().shutdown(std::net::Shutdown::Write);
            let _ = reader.read_to_end(&mut rest);
            seen
        });
        (client, handle)
    }

    #[test]
    fn commands_events_and_unknown_events() {
        let (stream, server) = fake_qemu(vec![
            (
                r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": ID}"#,
                vec![
                    r#"{"event": "SOME_FUTURE_EVENT", "data": {"x": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                ],
            ),
            (
                r#"{"error": {"class": "GenericError", "desc": "No VNC display"}, "id": ID}"#,
                vec![],
            ),
            (
                r#"{"return": {}, "id": ID}"#,
                vec![
                    r#"{"event": "POWERDOWN", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                    r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                ],
            ),
        ]);
        let qmp = QmpClient::handshake(stream, Duration::from_secs(5)).unwrap();
        assert_eq!(
            qmp.version(),
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(qmp.query_status().unwrap(), "running");
        let err = qmp.change_vnc_password("secret").unwrap_err();
        assert_eq!(err.to_string(), "change-vnc-password: No VNC display");
        qmp.system_powerdown().unwrap();
        assert!(qmp.wait_closed(Duration::from_secs(5)));
        assert_eq!(
            qmp.shutdown_event(),
            Some(ShutdownEvent {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
        let names: Vec<_> = qmp.events().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["SOME_FUTURE_EVENT", "POWERDOWN", "SHUTDOWN"]);
        assert!(matches!(qmp.stop(), Err(QmpError::Disconnected)));
        // quit on a closed connection counts as done.
        qmp.quit().unwrap();
        drop(qmp);

        let seen = server.join().unwrap();
        assert_eq!(seen[0]["execute"], "query-status");
        assert_eq!(seen[1]["arguments"], serde_json::json!({"password": "secret"}));
        assert_eq!(seen[2]["execute"], "system_powerdown");
        let ids: Vec<_> = seen.iter().map(|c| c["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3]);
    }

    #[test]
    fn migrate_arguments_fit_old_and_new_qemu() {
        let (stream, server) = fake_qemu(vec![
            (r#"{"return": {}, "id": ID}"#, vec![]),
            (r#"{"return": {}, "id": ID}"#, vec![]),
            (
                r#"{"return": {"status": "completed", "ram": {"transferred": 1}}, "id": ID}"#,
                vec![],
            ),
        ]);
        let qmp = QmpClient::handshake(stream, Duration::from_secs(5)).unwrap();
        qmp.migrate("fd:state").unwrap();
        qmp.migrate_incoming("fd:state").unwrap();
        assert_eq!(qmp.query_migrate().unwrap(), ("completed".to_owned(), None));
        drop(qmp);
        let seen = server.join().unwrap();
        // Only uri: QEMU 7.2 knows neither channels nor exit-on-error.
        assert_eq!(seen[0]["arguments"], serde_json::json!({"uri": "fd:state"}));
        assert_eq!(seen[1]["arguments"], serde_json::json!({"uri": "fd:state"}));
    }

    #[test]
    fn silent_server_times_out_and_late_replies_are_skipped() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut writer = server.try_clone().unwrap();
        writer
            .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 9}}}}\n")
            .unwrap();
        let mut reader = BufReader::new(server);
        let responder = std::thread::spawn(move || {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            writer.write_all(b"{\"return\": {}}\n").unwrap();
            // First command: no answer until the second arrives, then both answers.
            line.clear();
            reader.read_line(&mut line).unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            writer
                .write_all(b"{\"return\": {\"status\": \"stale\"}, \"id\": 1}\n")
                .unwrap();
            writer
                .write_all(b"{\"return\": {\"status\": \"paused\", \"running\": false}, \"id\": 2}\n")
                .unwrap();
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let qmp = QmpClient::handshake(client, Duration::from_millis(300)).unwrap();
        assert!(matches!(qmp.query_status(), Err(QmpError::Timeout { .. })));
        let mut qmp = qmp;
        qmp.set_timeout(Duration::from_secs(5));
        assert_eq!(qmp.query_status().unwrap(), "paused");
        drop(qmp);
        responder.join().unwrap();
    }
}
