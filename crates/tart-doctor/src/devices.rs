//! Device nodes and privileges: vsock for the guest agent, taps for the shared network.

use std::fs::OpenOptions;
use std::path::Path;

use tart_qemu::{HostInfo, VsockDevice};

use crate::Check;

pub fn checks(host: &HostInfo, net_admin: bool) -> Vec<Check> {
    vec![vsock(host), vhost_net(), tun(net_admin), net_admin_check(net_admin)]
}

fn vsock(host: &HostInfo) -> Check {
    const NAME: &str = "vsock";
    match VsockDevice::choose(host, false) {
        Some(VsockDevice::Kernel { .. }) => {
            Check::ok(NAME, "kernel vhost-vsock (/dev/vhost-vsock) for the guest agent")
        }
        Some(VsockDevice::VhostUser { binary }) => Check::warning(
            NAME,
            format!(
                "no /dev/vhost-vsock: the guest agent is reached through the userspace fallback {} (VMs started with \
                 --suspendable get no vsock)",
                binary.display()
            ),
            "modprobe vhost_vsock",
        ),
        None => Check::warning(
            NAME,
            "neither /dev/vhost-vsock nor vhost-device-vsock: tart exec and tart ip --resolver agent cannot reach \
             guests",
            "modprobe vhost_vsock, or cargo install --locked --root /usr/local vhost-device-vsock",
        ),
    }
}

fn vhost_net() -> Check {
    const NAME: &str = "vhost-net";
    if Path::new("/dev/vhost-net").exists() {
        Check::ok(NAME, "/dev/vhost-net is present")
    } else {
        // QEMU serves virtio-net itself for tart's NICs; vhost-net would only offload it.
        Check::ok(
            NAME,
            "no /dev/vhost-net; not needed: QEMU serves tart's virtio-net NICs itself",
        )
    }
}

fn tun(net_admin: bool) -> Check {
    const NAME: &str = "tun";
    match OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => Check::ok(NAME, "/dev/net/tun opens: taps for the shared and bridged networks"),
        Err(err) => Check::needed(
            net_admin,
            NAME,
            format!("cannot open /dev/net/tun ({err}): the shared, Softnet, host-only and bridged networks need taps"),
            "modprobe tun",
        ),
    }
}

fn net_admin_check(net_admin: bool) -> Check {
    const NAME: &str = "CAP_NET_ADMIN";
    if net_admin {
        Check::ok(NAME, "present: VMs get tart's shared NAT network by default")
    } else {
        Check::warning(
            NAME,
            "missing: VMs default to user-mode networking (--net-user); the shared network, Softnet and host-only \
             need root",
            "run tart as root (sudo tart run <vm>)",
        )
    }
}
