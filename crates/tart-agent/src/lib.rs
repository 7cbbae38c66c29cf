//! The guest agent for Linux guests (`tart-guest-agent`) and the host-side client that `tart exec`
//! and `tart ip --resolver=agent` use to talk to it.
//!
//! Both speak exactly the protocol of Cirrus Labs' tart-guest-agent (`proto/agent.proto`, copied
//! field for field): gRPC over cleartext HTTP/2, service `Agent` without a package, so the paths are
//! `/Agent/Exec` and `/Agent/ResolveIP`. In a VM the agent listens on AF_VSOCK port
//! [`AGENT_VSOCK_PORT`]; either agent works with either client.
//!
//! `Exec` is one bidirectional stream per command:
//! * the client's first message is a `command` (argv, `interactive`, `tty`, initial terminal
//!   size). With `interactive`, its stdin follows as `standard_input` chunks, and an empty chunk
//!   means end of input (the agent closes the child's stdin, or types ^D into the terminal).
//!   `terminal_resize` messages follow the client's window.
//! * the agent answers with `standard_output`/`standard_error` chunks of at most
//!   [`server::CHUNK_SIZE`] bytes (with a tty everything is `standard_output`), then exactly one
//!   `exit`, last, once all output has been sent.
//!
//! `ResolveIP` answers the guest's first global unicast IPv4 address, which lets the host find a
//! VM's address without DHCP lease files or ARP tables.

pub mod client;
pub mod server;
mod socket_path;

/// Code generated from `proto/agent.proto`: the messages, the `Agent` server trait and client stub.
pub mod proto {
    // The .proto has no package, for which prost names its output `_.rs`.
    tonic::include_proto!("_");
}

pub use client::{AgentClient, Error, ExecCommand, Stdin};
pub use proto::TerminalSize;
pub use socket_path::SocketPath;
/// The codes of [`Error::Status`], e.g. `Unavailable` when the connection to the agent broke.
pub use tonic::Code;

/// The AF_VSOCK port both agents listen on.
pub const AGENT_VSOCK_PORT: u32 = 8080;
