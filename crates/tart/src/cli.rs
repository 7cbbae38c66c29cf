use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "tart",
    version,
    about = "Run virtual machines on Linux hosts and ship them through any OCI registry",
    propagate_version = true,
    disable_help_subcommand = false
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a VM
    Create(CreateArgs),
    /// Clone a VM (a local one, or an image from a registry)
    Clone(CloneArgs),
    /// Run a VM
    Run(RunArgs),
    /// Modify a VM's configuration
    Set(SetArgs),
    /// Get a VM's configuration
    Get(GetArgs),
    /// List created VMs and cached images
    List(ListArgs),
    /// Log in to a registry
    Login(LoginArgs),
    /// Log out from a registry
    Logout(LogoutArgs),
    /// Get a running VM's IP address
    Ip(IpArgs),
    /// Execute a command in a running VM (needs the guest agent, tart-guest-agent)
    Exec(ExecArgs),
    /// Pull a VM from a registry
    Pull(PullArgs),
    /// Push a VM to a registry
    Push(PushArgs),
    /// Import a VM from a compressed .tvm file (Apple Archive, as macOS Tart writes it)
    Import(ImportArgs),
    /// Export a VM to a compressed .tvm file that macOS Tart can import
    Export(ExportArgs),
    /// Prune OCI caches or local VMs
    Prune(PruneArgs),
    /// Rename a local VM
    Rename(RenameArgs),
    /// Stop a VM
    Stop(StopArgs),
    /// Delete one or more VMs
    Delete(DeleteArgs),
    /// Get a fully-qualified VM name
    #[command(hide = true)]
    Fqn(FqnArgs),
    /// Suspend a running VM (its state is saved; the next `tart run` resumes it)
    Suspend(SuspendArgs),
    /// Check whether this host can run VMs well, and how to fix what is missing
    Doctor(DoctorArgs),
    /// Print a shell completion script
    Completions(CompletionsArgs),
    /// Print the man page (roff)
    #[command(hide = true)]
    Manpage,
}

impl Command {
    /// Tart collects stale `tmp/` entries before every command but these two, whose staging
    /// directories must survive an interruption so the next attempt can resume.
    pub fn runs_tmp_gc(&self) -> bool {
        !matches!(
            self,
            Command::Pull(_) | Command::Clone(_) | Command::Completions(_) | Command::Manpage
        )
    }
}

#[derive(Args, Debug)]
pub struct IpArgs {
    /// VM name
    pub name: String,
    /// Seconds to keep trying to resolve an address
    #[arg(long, default_value_t = 0, value_name = "seconds")]
    pub wait: u16,
    /// How to find the address: the DHCP server's leases, the host's ARP table, or the guest agent
    #[arg(long, default_value = "dhcp", value_parser = ["dhcp", "arp", "agent"])]
    pub resolver: String,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Attach the command's standard input to ours
    #[arg(short = 'i')]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal (ours goes into raw mode when it is a terminal)
    #[arg(short = 't')]
    pub tty: bool,
    /// VM name
    pub name: String,
    /// Command to run and its arguments
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "command"
    )]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// VM name
    pub name: String,
    /// Don't serve the VM's display (headless)
    #[arg(long)]
    pub no_graphics: bool,
    /// Serve the display even with a VNC flag (accepted for Tart compatibility)
    #[arg(long, hide = true)]
    pub graphics: bool,
    /// Attach a new pseudo-terminal as the serial console and print its path
    #[arg(long)]
    pub serial: bool,
    /// Attach an existing terminal device or a file as the serial console
    #[arg(long, value_name = "path")]
    pub serial_path: Option<PathBuf>,
    /// Serve the display over VNC on 127.0.0.1 and print its vnc:// URL
    #[arg(long)]
    pub vnc: bool,
    /// Same as --vnc (Tart's name for its password-protected local VNC server)
    #[arg(long)]
    pub vnc_experimental: bool,
    /// Root disk options: ro, sync=none|fsync|full, caching=automatic|cached|uncached (comma-separated)
    #[arg(long, default_value = "", value_name = "options")]
    pub root_disk_opts: String,
    /// No audio device (the VM has none anyway)
    #[arg(long)]
    pub no_audio: bool,
    /// No clipboard sharing (the VM has none anyway; cirrus-cli passes it)
    #[arg(long)]
    pub no_clipboard: bool,
    /// Boot macOS recovery (refused: macOS guests need a macOS host)
    #[arg(long, hide = true)]
    pub recovery: bool,
    /// Rosetta share for Linux guests (refused: Rosetta exists only on Apple silicon Macs)
    #[arg(long, hide = true, value_name = "tag")]
    pub rosetta: Option<String>,
    /// Only devices whose state can be saved, so that tart suspend works (no --dir; the guest
    /// agent only with the kernel's vhost-vsock)
    #[arg(long)]
    pub suspendable: bool,
    /// No keyboard
    #[arg(long)]
    pub no_keyboard: bool,
    /// No pointing device
    #[arg(long)]
    pub no_pointer: bool,
    /// Additional disk: an image file, ISO, block device, nbd:// URL or cached remote VM name,
    /// with options ro, sync=, caching= after a colon
    #[arg(long, value_name = "path[:options]")]
    pub disk: Vec<String>,
    /// Share a host directory over virtio-fs; options ro, tag=<TAG> after a colon (Linux guests:
    /// mount -t virtiofs com.apple.virtio-fs.automount /mnt)
    #[arg(long, value_name = "[name:]path[:options]")]
    pub dir: Vec<String>,
    /// Let the guest run VMs itself (needs KVM with nested support, or an arm64 VM)
    #[arg(long)]
    pub nested: bool,
    /// Bridged networking: a tap on a host bridge, or a macvtap on another interface
    /// (repeatable, one NIC each; "list" lists the candidates)
    #[arg(long, value_name = "interface")]
    pub net_bridged: Vec<String>,
    /// Softnet isolation on the shared network: DHCP/DNS and the Internet, but not other VMs,
    /// the host or private ranges
    #[arg(long)]
    pub net_softnet: bool,
    /// Private ranges a Softnet VM may reach (comma-separated CIDRs; implies --net-softnet)
    #[arg(long, value_name = "CIDRs")]
    pub net_softnet_allow: Option<String>,
    /// Ranges a Softnet VM may not reach, even if allowed (comma-separated CIDRs; implies
    /// --net-softnet)
    #[arg(long, value_name = "CIDRs")]
    pub net_softnet_block: Option<String>,
    /// Host TCP ports that lead to the Softnet VM's ports (EXT:INT,...; implies --net-softnet)
    #[arg(long, value_name = "EXT:INT,...")]
    pub net_softnet_expose: Option<String>,
    /// Host-only networking: the host and other VMs, no route out
    #[arg(long)]
    pub net_host: bool,
    /// User-mode networking (QEMU's slirp, or passt): outbound NAT without privileges; the
    /// default when tart cannot manage network interfaces (no CAP_NET_ADMIN)
    #[arg(long)]
    pub net_user: bool,
    /// Host TCP ports that lead to guest ports with user-mode networking (EXT:INT,...;
    /// implies --net-user)
    #[arg(long, value_name = "EXT:INT,...")]
    pub net_user_expose: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SuspendArgs {
    /// VM name
    pub name: String,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// VM name
    pub name: String,
    /// Create a macOS VM from an IPSW (needs a macOS host; refused here)
    #[arg(long, value_name = "path")]
    pub from_ipsw: Option<String>,
    /// Create an empty Linux VM booting with UEFI
    #[arg(long, conflicts_with = "from_image")]
    pub linux: bool,
    /// Create a Linux VM from a cloud image (qcow2, raw, vmdk or vhdx): a file or an http(s) URL
    /// (downloaded once into the cache); it gets a cloud-init seed (user admin, password admin)
    #[arg(long, value_name = "file or URL")]
    pub from_image: Option<String>,
    /// With --from-image: the image's SHA-256, checked before it is used
    #[arg(long, value_name = "hex", requires = "from_image")]
    pub sha256: Option<String>,
    /// cloud-init user-data for the VM's seed instead of tart's default (#cloud-config or #! script)
    #[arg(long, value_name = "file")]
    pub user_data: Option<PathBuf>,
    /// Disk size in GB (10^9 bytes); default 50 for --linux, the image's size for --from-image
    #[arg(long, value_name = "GB")]
    pub disk_size: Option<u16>,
    /// Disk image format
    #[arg(long, default_value = "raw", ignore_case = true, value_parser = ["raw", "asif"])]
    pub disk_format: String,
    /// Replace an existing VM of the same name (Tart does this silently; we refuse without it)
    #[arg(long)]
    pub force: bool,
}

/// How to reach a registry.
#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Connect to the registry over plain HTTP
    #[arg(long)]
    pub insecure: bool,
    /// Also trust this CA certificate (PEM) for the registry's TLS; repeatable
    #[arg(long, value_name = "path", env = "TART_REGISTRY_CA_CERT")]
    pub ca_cert: Vec<PathBuf>,
}

/// How to pull.
#[derive(Args, Debug, Clone)]
pub struct PullFlags {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Number of layers to download in parallel
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Accepted for Tart compatibility: chunks already in local images are always reused (and
    /// share extents with them on reflink filesystems)
    #[arg(long, hide = true)]
    pub deduplicate: bool,
    /// Platform to take from a multi-arch image (index or manifest list); default: the host's
    #[arg(long, value_enum)]
    pub arch: Option<ImageArch>,
    /// For a KubeVirt containerDisk with several files in /disk: the one to use as the VM's
    /// disk, e.g. /disk/server.qcow2 (KubeVirt's containerDisk.path)
    #[arg(long, value_name = "path")]
    pub containerdisk_path: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ImageArch {
    Amd64,
    Arm64,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Remote VM name, e.g. ghcr.io/cirruslabs/debian:latest
    pub remote_name: String,
    #[command(flatten)]
    pub flags: PullFlags,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Local VM, or a remote VM already in the cache (re-tagged without uploading layers)
    pub local_name: String,
    /// Remote names to push to; several tags of one repository are pushed once
    #[arg(required = true)]
    pub remote_names: Vec<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Number of disk chunks compressed and uploaded in parallel
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Upload blobs in PATCH requests of this many MB (10^6 bytes); 0 uploads each blob in one PUT
    #[arg(long, default_value_t = 0, value_name = "MB")]
    pub chunk_size: usize,
    /// Add a label to the OCI config (key=value); repeatable
    #[arg(long, value_name = "key=value")]
    pub label: Vec<String>,
    /// Also store the pushed VM in the local OCI cache
    #[arg(long)]
    pub populate_cache: bool,
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Registry host, with its port if any: ghcr.io, localhost:5000
    pub host: String,
    #[arg(long)]
    pub username: Option<String>,
    /// Read the password from standard input
    #[arg(long)]
    pub password_stdin: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Store the credentials without checking them against the registry
    #[arg(long)]
    pub no_validate: bool,
}

#[derive(Args, Debug)]
pub struct LogoutArgs {
    /// Registry host, with its port if any
    pub host: String,
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    /// Source VM: a local name or a remote name such as ghcr.io/cirruslabs/debian:latest
    pub source_name: String,
    /// Name of the new local VM
    pub new_name: String,
    #[command(flatten)]
    pub pull: PullFlags,
    /// Largest amount of cache (GiB) that automatic pruning may delete to make room
    #[arg(long, default_value_t = 100, value_name = "GiB")]
    pub prune_limit: u64,
    /// Replace an existing VM of the same name
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// VM name
    pub name: String,
    /// Number of VM CPUs
    #[arg(long)]
    pub cpu: Option<u16>,
    /// VM memory size in megabytes (MiB)
    #[arg(long)]
    pub memory: Option<u64>,
    /// VM display resolution in WIDTHxHEIGHT[pt|px] format
    #[arg(long)]
    pub display: Option<String>,
    /// Whether to automatically reconfigure the display to fit the window
    #[arg(long, overrides_with = "no_display_refit")]
    pub display_refit: bool,
    #[arg(long, overrides_with = "display_refit", hide = true)]
    pub no_display_refit: bool,
    /// Generate a new random MAC address
    #[arg(long)]
    pub random_mac: bool,
    /// Generate a new random serial number: macOS VMs only, Linux VMs have none (a no-op for them,
    /// as in Tart)
    #[arg(long, hide = true)]
    pub random_serial: bool,
    /// Replace the VM's disk with a copy of this image file
    #[arg(long, value_name = "path")]
    pub disk: Option<PathBuf>,
    /// Grow the disk to this size in GB (10^9 bytes)
    #[arg(long, value_name = "GB")]
    pub disk_size: Option<u16>,
    /// Replace the cloud-init user-data (#cloud-config or #! script); cloud-init applies it at the
    /// next boot, as a new instance
    #[arg(long, value_name = "file")]
    pub user_data: Option<PathBuf>,
}

impl SetArgs {
    /// Tart assigns this on every `set`, so omitting both flags clears a stored value.
    pub fn display_refit(&self) -> Option<bool> {
        match (self.display_refit, self.no_display_refit) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// VM name
    pub name: String,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only show VMs from this source: local or oci
    #[arg(long, value_parser = ["local", "oci"])]
    pub source: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
    /// Only print VM names, one per line
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Entries to prune: "caches" (OCI cache) or "vms" (local VMs that are not running)
    #[arg(long, default_value = "caches")]
    pub entries: String,
    /// Prune entries last accessed this many days ago or earlier
    #[arg(long, value_name = "n")]
    pub older_than: Option<u64>,
    /// Shrink to this many GiB, deleting the least recently accessed entries first
    #[arg(long, value_name = "n")]
    pub space_budget: Option<u64>,
    #[arg(long, hide = true)]
    pub cache_budget: Option<u64>,
    /// Remove cache entries that nothing references
    #[arg(long, hide = true)]
    pub gc: bool,
}

#[derive(Args, Debug)]
pub struct RenameArgs {
    pub name: String,
    pub new_name: String,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    pub name: String,
    /// Seconds to wait for the VM to stop before killing it
    #[arg(short, long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[arg(required = true)]
    pub names: Vec<String>,
}

#[derive(Args, Debug)]
pub struct FqnArgs {
    pub name: String,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Path to the .tvm file
    pub path: PathBuf,
    /// Name of the new local VM
    pub name: String,
    /// Replace an existing VM of the same name
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Local VM or remote VM in the cache
    pub name: String,
    /// Where to write the archive (default: <name>.tvm in the current directory)
    pub path: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}
