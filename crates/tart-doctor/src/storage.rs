//! `TART_HOME`: room for VMs and images, and the shared network's settings.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tart_home::TartHome;
use tart_net::{Cidr, Settings, SETTINGS_FILE};

use crate::Check;

const GIB: u64 = 1 << 30;
/// Below this, a VM's disk fills up soon (Tart's default disk is 50 GB, sparse).
const LOW_SPACE: u64 = 10 * GIB;
/// Below this, even cloning or pulling a small VM fails.
const NO_SPACE: u64 = GIB;

pub fn checks(home: &TartHome, net_admin: bool) -> Vec<Check> {
    let mut checks = vec![space("TART_HOME", home.root())];
    let cache = home.oci_cache_dir();
    if device(&cache) != device(home.root()) {
        checks.push(space("cache", &cache));
    }
    checks.push(subnet(home.root(), net_admin));
    checks
}

fn device(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
}

/// Bytes available to this user on the file system of `path`.
fn available(path: &Path) -> std::io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs is plain data; zero is valid for every field.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid C string and stat a valid statvfs to write to.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn space(name: &'static str, path: &Path) -> Check {
    let fix = format!(
        "free space on the file system of {}, or point TART_HOME elsewhere",
        path.display()
    );
    let bytes = match available(path) {
        Ok(bytes) => bytes,
        Err(err) => {
            return Check::problem(
                name,
                format!("cannot read the free space of {}: {err}", path.display()),
                fix,
            )
        }
    };
    let message = format!("{:.1} GiB free in {}", bytes as f64 / GIB as f64, path.display());
    match bytes {
        _ if bytes < NO_SPACE => Check::problem(name, message, fix),
        _ if bytes < LOW_SPACE => Check::warning(name, format!("{message}: VM disks fill up soon"), fix),
        _ => Check::ok(name, message),
    }
}

/// The shared network's subnet must be one the host does not route elsewhere already.
fn subnet(home: &Path, net_admin: bool) -> Check {
    const NAME: &str = "subnet";
    let file = home.join(SETTINGS_FILE);
    let settings = match Settings::load(home) {
        Ok(settings) => settings,
        Err(err) => {
            return Check::needed(
                net_admin,
                NAME,
                err.to_string(),
                format!("correct or remove {}", file.display()),
            )
        }
    };
    let clashes = match tart_net::overlapping_routes(settings.subnet) {
        Ok(clashes) => clashes,
        Err(err) => {
            return Check::ok(
                NAME,
                format!("{}; cannot read the host's routes: {err}", settings.subnet),
            )
        }
    };
    let Some(clash) = clashes.first() else {
        return Check::ok(
            NAME,
            format!("{} is not routed elsewhere on this host", settings.subnet),
        );
    };
    let free = ["192.168.64.0/24", "10.77.0.0/24", "172.30.64.0/24", "10.203.0.0/24"]
        .iter()
        .map(|text| text.parse::<Cidr>().expect("valid"))
        .find(|candidate| tart_net::overlapping_routes(*candidate).is_ok_and(|routes| routes.is_empty()));
    Check::needed(
        net_admin,
        NAME,
        format!(
            "the shared network's subnet {} clashes with the host's route to {} via {}",
            settings.subnet, clash.destination, clash.interface
        ),
        match free {
            Some(free) => format!("echo '{{\"subnet\": \"{free}\"}}' >{}", file.display()),
            None => format!("choose a free private subnet in {}", file.display()),
        },
    )
}
