//! `--net-softnet-expose`: host TCP ports that lead to a Softnet VM's ports, proxied by
//! `tart run` itself (as Softnet does), so that they answer on every host address, loopback
//! included, without NAT rules in the host's tables.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use tart_qemu::PortForward;

use crate::{io_context, Result};

/// Listening sockets bound before the VM starts (a port in use is an error at once), served
/// until the process ends.
#[derive(Debug)]
pub struct PortForwarder {
    listeners: Vec<(TcpListener, u16)>,
}

impl PortForwarder {
    pub fn bind(forwards: &[PortForward]) -> Result<PortForwarder> {
        let listeners = forwards
            .iter()
            .map(|forward| {
                let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, forward.host));
                TcpListener::bind(address)
                    .map(|listener| (listener, forward.guest))
                    .map_err(io_context(format!(
                        "failed to listen on host port {} to expose it",
                        forward.host
                    )))
            })
            .collect::<Result<_>>()?;
        Ok(PortForwarder { listeners })
    }

    /// Serves every connection to a bound port by connecting to the same guest port at
    /// `guest`, in background threads.
    pub fn serve(self, guest: Ipv4Addr) {
        for (listener, port) in self.listeners {
            let target = SocketAddrV4::new(guest, port);
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    std::thread::spawn(move || proxy(client, target));
                }
            });
        }
    }
}

fn proxy(client: TcpStream, target: SocketAddrV4) {
    let Ok(upstream) = TcpStream::connect_timeout(&target.into(), Duration::from_secs(10)) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client_reader), Ok(upstream_reader)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let upload = std::thread::spawn(move || pump(client_reader, upstream));
    pump(upstream_reader, client);
    let _ = upload.join();
}

/// Copies one direction until its end, then passes the end on (half-close).
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}
