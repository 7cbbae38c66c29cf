//! The agent side: the `Agent` gRPC service and the listeners it is served on.

mod exec;
mod pty;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};
use tonic::{Request, Response, Status, Streaming};

use crate::proto::agent_server::{Agent, AgentServer};
use crate::proto::{exec_request, ExecRequest, ExecResponse, ResolveIpRequest, ResolveIpResponse};
use crate::socket_path::SocketPath;

/// The largest output chunk the agent sends, as Cirrus's agent does.
pub const CHUNK_SIZE: usize = 4096;

/// Where the agent accepts connections (`--listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// AF_VSOCK on this port, any CID: how the host reaches the agent in a VM.
    Vsock(u32),
    /// A Unix stream socket: for tests, and for guests reached through a socket proxy.
    Unix(PathBuf),
}

impl Default for Listen {
    fn default() -> Self {
        Listen::Vsock(crate::AGENT_VSOCK_PORT)
    }
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid listen address {s:?}: expected vsock:PORT or unix:PATH");
        match s.split_once(':') {
            Some(("vsock", port)) => port.parse().map(Listen::Vsock).map_err(|_| invalid()),
            Some(("unix", path)) if !path.is_empty() => Ok(Listen::Unix(path.into())),
            _ => Err(invalid()),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Vsock(port) => write!(f, "vsock:{port}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {listen}: {source}{}", bind_hint(listen, source))]
    Bind { listen: Listen, source: io::Error },
    #[error("serving gRPC failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn bind_hint(listen: &Listen, err: &io::Error) -> &'static str {
    match (listen, err.raw_os_error()) {
        (Listen::Vsock(_), Some(libc::EAFNOSUPPORT | libc::ENODEV)) => {
            " (is the guest kernel's virtio vsock transport loaded? modprobe vmw_vsock_virtio_transport, \
             or use --listen unix:PATH)"
        }
        (Listen::Vsock(_), Some(libc::EADDRINUSE)) | (Listen::Unix(_), Some(libc::EADDRINUSE)) => {
            " (another agent is already listening there; for a Unix socket, a stale socket file may be left: \
             remove it)"
        }
        _ => "",
    }
}

enum Incoming {
    Vsock(VsockListener),
    Unix(UnixListener),
}

/// A bound listener, ready to serve the `Agent` service.
pub struct Server {
    incoming: Incoming,
}

impl Server {
    /// Binds `listen`. Must be called within a Tokio runtime.
    pub fn bind(listen: &Listen) -> Result<Server, ServeError> {
        let bind_error = |source| ServeError::Bind {
            listen: listen.clone(),
            source,
        };
        let incoming = match listen {
            Listen::Vsock(port) => {
                Incoming::Vsock(VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, *port)).map_err(bind_error)?)
            }
            Listen::Unix(path) => {
                let path = SocketPath::new(path).map_err(bind_error)?;
                Incoming::Unix(UnixListener::bind(path.as_path()).map_err(bind_error)?)
            }
        };
        Ok(Server { incoming })
    }

    /// Serves until the listener fails.
    pub async fn run(self) -> Result<(), ServeError> {
        let router = tonic::transport::Server::builder().add_service(AgentServer::new(AgentService));
        match self.incoming {
            Incoming::Vsock(listener) => router.serve_with_incoming(listener.incoming()).await?,
            Incoming::Unix(listener) => router.serve_with_incoming(UnixListenerStream::new(listener)).await?,
        }
        Ok(())
    }
}

/// Output chunks queued per session before the agent stops reading the command's output: bounds
/// memory when the client reads slower than the command writes.
const OUTPUT_QUEUE: usize = 16;

struct AgentService;

#[tonic::async_trait]
impl Agent for AgentService {
    type ExecStream = ReceiverStream<Result<ExecResponse, Status>>;

    async fn exec(&self, request: Request<Streaming<ExecRequest>>) -> Result<Response<Self::ExecStream>, Status> {
        let mut requests = request.into_inner();
        let command = match requests.message().await? {
            Some(ExecRequest {
                r#type: Some(exec_request::Type::Command(command)),
            }) => command,
            _ => {
                return Err(Status::invalid_argument(
                    "the first ExecRequest must be the command to run",
                ))
            }
        };
        let (output, responses) = mpsc::channel(OUTPUT_QUEUE);
        tokio::spawn(exec::run(command, requests, output));
        Ok(Response::new(ReceiverStream::new(responses)))
    }

    async fn resolve_ip(&self, _: Request<ResolveIpRequest>) -> Result<Response<ResolveIpResponse>, Status> {
        let addresses = interface_ipv4_addresses()
            .map_err(|e| Status::internal(format!("cannot list the guest's network interfaces: {e}")))?;
        match addresses.into_iter().find(|ip| is_global_unicast(*ip)) {
            Some(ip) => Ok(Response::new(ResolveIpResponse { ip: ip.to_string() })),
            None => Err(Status::not_found(NO_GLOBAL_IPV4)),
        }
    }
}

/// The `ResolveIP` error message when the guest has no usable address (yet).
pub const NO_GLOBAL_IPV4: &str =
    "the guest has no global unicast IPv4 address yet; check that its network is configured (DHCP)";

/// What Go's `net.IP.IsGlobalUnicast` accepts, as Cirrus's agent uses it: private ranges count.
fn is_global_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_link_local() || ip.is_multicast() || ip.is_broadcast())
}

/// The IPv4 addresses of all interfaces, in the kernel's order.
fn interface_ipv4_addresses() -> io::Result<Vec<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let ifaddr = unsafe { &*entry };
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its real type.
        if !ifaddr.ifa_addr.is_null() && i32::from(unsafe { (*ifaddr.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: checked to be AF_INET just above.
            let sin = unsafe { &*ifaddr.ifa_addr.cast::<libc::sockaddr_in>() };
            addresses.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        entry = ifaddr.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and nothing borrowed from it is used after this.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parses_and_displays() {
        assert_eq!("vsock:8080".parse(), Ok(Listen::Vsock(8080)));
        assert_eq!("unix:/run/a.sock".parse(), Ok(Listen::Unix("/run/a.sock".into())));
        assert_eq!(Listen::default().to_string(), "vsock:8080");
        for bad in ["vsock:x", "unix:", "tcp:1", "8080"] {
            assert!(bad
                .parse::<Listen>()
                .unwrap_err()
                .contains("expected vsock:PORT or unix:PATH"));
        }
    }

    #[test]
    fn global_unicast_matches_go() {
        for ip in ["192.168.64.2", "10.0.2.15", "8.8.8.8"] {
            assert!(is_global_unicast(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "169.254.1.1", "0.0.0.0", "224.0.0.1", "255.255.255.255"] {
            assert!(!is_global_unicast(ip.parse().unwrap()), "{ip}");
        }
    }
}
