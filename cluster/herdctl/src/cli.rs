//! The command line, as clap derive types (kept apart so tests can check it with `Command::debug_assert`).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Operate a herd site: from the inventory to a running, upgraded cluster.
#[derive(Debug, Parser)]
#[command(name = "herdctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// How to reach the cluster (etcd), for the unit, machine and pre-warm commands.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands that never talk to the cluster, by path: the cluster flags are hidden from their help.
const WITHOUT_CLUSTER: [&[&str]; 8] = [
    &["inventory"],
    &["pki"],
    &["config"],
    &["image"],
    &["demo"],
    &["machine", "list"],
    &["machine", "show"],
    &["machine", "reprovision"],
];

/// The command line as users see it: [`Cli`] with the cluster flags (global, so that they may come before or after
/// the command) hidden from the help of the commands in [`WITHOUT_CLUSTER`]. They are still accepted there, as the
/// same flags: a script that sets `HERD_ENDPOINT` for everything runs `herdctl inventory check` unchanged.
pub fn command() -> clap::Command {
    use clap::{Args as _, CommandFactory as _};
    let hidden: Vec<clap::Arg> = ClusterArgs::augment_args(clap::Command::new("cluster"))
        .get_arguments()
        .map(|a| a.clone().hide(true))
        .collect();
    // clap copies a global flag into a subcommand only when the subcommand has no flag of that id: the hidden
    // copies placed first stay, and are copied further down from there.
    fn hide(cmd: clap::Command, path: &[&str], hidden: &[clap::Arg]) -> clap::Command {
        match path.split_first() {
            None => hidden.iter().fold(cmd, |c, a| c.arg(a.clone())),
            Some((first, rest)) => cmd.mut_subcommand(*first, |sc| hide(sc, rest, hidden)),
        }
    }
    // The machine commands talk to the provisioner's operator API with the same credential.
    let but_credentials: Vec<clap::Arg> = hidden.iter().filter(|a| a.get_id() != "credentials").cloned().collect();
    WITHOUT_CLUSTER.iter().fold(Cli::command(), |cmd, path| {
        hide(cmd, path, if path[0] == "machine" { &but_credentials } else { &hidden })
    })
}

/// Parses the process's arguments with [`command`] (clap's usual exit on `--help` or a mistake).
pub fn parse() -> Cli {
    use clap::FromArgMatches as _;
    Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
}

/// Where the cluster's etcd is, and how to reach machines over SSH.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, global = true, env = "HERD_ENDPOINT", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoint: Vec<String>,
    /// An operator credential directory from `herdctl pki issue operator`: the CAs, certificates and keys for
    /// etcd (https endpoints) and the provisioner's operator API; the etcd file flags below override its parts.
    #[arg(long, global = true, env = "HERD_CREDENTIALS", value_name = "DIR")]
    pub credentials: Option<PathBuf>,
    /// CA bundle that signed etcd's certificates (turns on TLS).
    #[arg(long, global = true, env = "HERD_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<String>,
    /// Client certificate for etcd.
    #[arg(long, global = true, env = "HERD_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<String>,
    /// Client key for etcd.
    #[arg(long, global = true, env = "HERD_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<String>,
    /// Reach etcd through an SSH tunnel to this host ([USER@]HOST[:PORT]), e.g. a master's external address.
    #[arg(long, global = true, env = "HERD_TUNNEL", value_name = "HOST")]
    pub tunnel: Option<String>,
    /// User for SSH to machines and tunnels.
    #[arg(long, global = true, env = "HERD_SSH_USER", default_value = "herd")]
    pub ssh_user: String,
    /// Port of the machines' SSH servers.
    #[arg(long, global = true, env = "HERD_SSH_PORT", default_value_t = 22)]
    pub ssh_port: u16,
    /// Private key for SSH [default: the SSH agent, then ~/.ssh/id_ed25519, ~/.ssh/id_rsa].
    #[arg(long, global = true, env = "HERD_SSH_IDENTITY", value_name = "FILE")]
    pub ssh_identity: Option<PathBuf>,
    /// Bound on each etcd request, in seconds.
    #[arg(long, global = true, default_value_t = 5)]
    pub request_timeout: u64,
}

/// Options of commands that change a unit's target state.
#[derive(Debug, Clone, clap::Args)]
pub struct Targets {
    /// Units by name, or unit files (submitted first, named after the file).
    #[arg(required = true, value_name = "UNIT|FILE")]
    pub units: Vec<String>,
    /// Return once the change is recorded, without waiting for the units to reach it.
    #[arg(long)]
    pub no_block: bool,
    /// How long to wait for the units, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Replace a submitted unit whose file differs from FILE.
    #[arg(long)]
    pub replace: bool,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check, show, generate and compare inventory files.
    Inventory {
        /// What to do with the inventory.
        #[command(subcommand)]
        command: InventoryCommand,
    },
    /// Machines as the provisioner sees them: state, boot timeline, reprovisioning.
    Machine {
        /// Base URL of the provisioner's operator API (HTTPS; with --credentials DIR or HERD_API_TOKEN).
        #[arg(long, global = true, env = "HERD_PROVISIONER", default_value = "https://127.0.0.1:8443")]
        provisioner: String,
        /// What to do.
        #[command(subcommand)]
        command: MachineCommand,
    },
    /// Render and lint machine configs (Ignition).
    Config {
        /// What to do with configs.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Store unit files in the cluster (inactive: placed nowhere until loaded or started).
    Submit {
        /// Unit files; each is named after its file (web@.service, db.service, ...).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Replace units whose stored file differs (a running unit restarts with the new file).
        #[arg(long)]
        replace: bool,
    },
    /// Place units on machines and install them, without starting them.
    Load(Targets),
    /// Place units and start them (blocks until they are active unless --no-block).
    Start(Targets),
    /// Stop units (they stay loaded where they are).
    Stop(Targets),
    /// Stop units and remove them from their machines (they stay submitted).
    Unload(Targets),
    /// Remove units from the cluster entirely.
    Destroy(Targets),
    /// Restart units one at a time: each is stopped, then started and active, before the next.
    Restart(Targets),
    /// Print a unit's file.
    Cat {
        /// The unit.
        unit: String,
    },
    /// Units placed on machines, with the state each machine reports.
    ListUnits {
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Every submitted unit with its target state and how many machines run it.
    ListUnitFiles {
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Machines registered in the cluster.
    ListMachines {
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// A unit's status on the machine that runs it (systemctl status, or the container's state), over SSH.
    Status {
        /// The unit.
        unit: String,
    },
    /// A unit's log on the machine that runs it (journalctl, or the container's log), over SSH.
    Journal {
        /// The unit.
        unit: String,
        /// Lines to show.
        #[arg(long, short = 'n', default_value_t = 50)]
        lines: u32,
        /// Keep following the log.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Run a command on a machine over SSH (a machine id, or a unit: the machine that runs it).
    Ssh {
        /// Machine id, or with --unit a unit name.
        target: String,
        /// TARGET is a unit: go to the machine running it.
        #[arg(long)]
        unit: bool,
        /// The command to run.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build herd's OS image.
    Image {
        /// What to do.
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// A QEMU cluster on this host, booted by the provisioner: `herdctl demo` brings it up (image, network
    /// namespace, provisioner, registry, three machines that PXE-boot, install, form etcd and register, a web
    /// container and a global unit), `herdctl demo down` removes all of it. Needs root.
    Demo {
        /// up (the default), down, power-off NAME, power-on NAME.
        #[command(subcommand)]
        command: Option<DemoCommand>,
        /// Where the demo keeps its files.
        #[command(flatten)]
        args: DemoArgs,
        /// Print progress and tables, or a JSON summary.
        #[arg(long, short = 'o', value_enum, default_value_t, global = true)]
        output: Output,
    },
    /// Benchmarks with hollow machines (the real agent code, a recording executor) against a real etcd.
    Bench {
        /// Which benchmark.
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// The site PKI: its two certificate authorities (etcd, api) and the certificates issued from them.
    Pki {
        /// The site PKI's directory (CA keys: keep it on the admin host, readable by its owner only).
        #[arg(long, global = true, env = "HERD_PKI_DIR", default_value = "/var/lib/herd/pki")]
        dir: PathBuf,
        /// What to do.
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Who may do what in etcd: users and roles by key prefix, from the inventory and the operators issued.
    Access {
        /// What to do.
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// The cluster-wide pre-warm list: images every machine pulls before it becomes schedulable.
    Prewarm {
        /// What to do.
        #[command(subcommand)]
        command: PrewarmCommand,
    },
}

/// `herdctl image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the image of a manifest: vmlinuz, initramfs (node-init as /init + boot modules), root.squashfs under
    /// dm-verity, root.verity and manifest.json. Reproducible for a given SOURCE_DATE_EPOCH and node-init binary;
    /// an unchanged input comes from the cache.
    Build {
        /// The image manifest.
        #[arg(long, default_value = "images/herd-os.toml", value_name = "FILE")]
        manifest: PathBuf,
        /// Where the outputs go.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The build cache.
        #[arg(long, env = "HERD_IMAGE_CACHE", default_value = "/var/cache/herd/images", value_name = "DIR")]
        cache: PathBuf,
        /// Timestamp of every file in the image (seconds since the Unix epoch).
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 1_767_225_600)]
        source_date_epoch: u64,
        /// Rebuild even if the cache has this image.
        #[arg(long)]
        no_cache: bool,
        /// The static node-init binary (scripts/build-node-init.sh prints its path).
        #[arg(
            long,
            env = "HERD_NODE_INIT",
            default_value = "target/x86_64-unknown-linux-gnu/release/node-init",
            value_name = "FILE"
        )]
        node_init: PathBuf,
    },
    /// Write a built image into slot a or b of an installed node's disk (a raw image file, a qcow2 image or a block
    /// device). A disk without herd's layout is partitioned first: USR-A, USR-B, STATE (ext4).
    /// The new slot is marked to be tried once if the other slot is bootable, and good otherwise.
    Install {
        /// The disk (create a file first, e.g. `qemu-img create -f qcow2 disk.qcow2 8G`).
        #[arg(long, value_name = "FILE|DEV")]
        disk: PathBuf,
        /// The slot to write.
        #[arg(long, value_name = "a|b")]
        slot: herd_images::slot::Slot,
        /// Size of each USR partition when the disk is partitioned, in MiB.
        #[arg(long, default_value_t = 1536, value_name = "MIB")]
        slot_size: u64,
        /// The built image (the --out directory of `herdctl image build`).
        #[arg(value_name = "DIR")]
        image: PathBuf,
    },
    /// Show or change the A/B slot bookkeeping of a disk (what node-init reads at boot).
    Slots {
        /// The disk.
        #[arg(long, value_name = "FILE|DEV")]
        disk: PathBuf,
        /// Mark this slot to be tried once on the next boot.
        #[arg(long = "try", value_name = "a|b", conflicts_with_all = ["good", "bad"])]
        try_slot: Option<herd_images::slot::Slot>,
        /// Mark this slot good (boots from now on).
        #[arg(long, value_name = "a|b", conflicts_with = "bad")]
        good: Option<herd_images::slot::Slot>,
        /// Mark this slot not bootable.
        #[arg(long, value_name = "a|b")]
        bad: Option<herd_images::slot::Slot>,
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
}

/// Options every benchmark shares.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Hollow machines.
    #[arg(long)]
    pub machines: usize,
    /// Units.
    #[arg(long)]
    pub units: usize,
    /// Racks the machines are spread over.
    #[arg(long, default_value_t = 12)]
    pub racks: usize,
    /// etcd connections the hollow machines share.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Use the etcd at --endpoint (its /herd/v1/ keys are deleted first!) instead of starting a local cluster
    /// from Debian's etcd-server.
    #[arg(long)]
    pub use_endpoint: bool,
    /// Members of the local etcd cluster. They share this machine's cores, so 3 members cost about 3 times the
    /// CPU per write that a real 3-master site spends on each master.
    #[arg(long, default_value_t = 3)]
    pub etcd_members: usize,
}

/// `herdctl bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Place units on hollow machines: units/s, etcd requests per unit, idle etcd traffic as units grow, memory
    /// per hollow machine. Goal: >= 1,500 units/s for 50,000 units on 5,000 machines.
    Scheduler {
        /// Machines, units, racks, connections, etcd.
        #[command(flatten)]
        args: BenchArgs,
        /// Agent lease TTL in seconds (keep-alives every third of it).
        #[arg(long, default_value_t = 30)]
        ttl: u64,
        /// Run it twice in one go, without and then with mutual TLS and etcd's users and roles (each hollow
        /// machine with a machine's permissions), and print the cost (goal: at most 15 % slower).
        #[arg(long, conflicts_with = "use_endpoint")]
        tls: bool,
    },
    /// Kill hollow machines and time until their units run elsewhere. Goal: <= 2 x TTL.
    Failover {
        /// Machines, units, racks, connections, etcd.
        #[command(flatten)]
        args: BenchArgs,
        /// Agent lease TTL in seconds (the engine's grace period is a quarter of it).
        #[arg(long, default_value_t = 5)]
        ttl: u64,
        /// Machines to kill, one after another.
        #[arg(long, default_value_t = 3)]
        trials: usize,
    },
}

/// `herdctl prewarm ...`
#[derive(Debug, Subcommand)]
pub enum PrewarmCommand {
    /// Add images to the list.
    Add {
        /// Image references (e.g. registry.example:5000/app:1.2).
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove images from the list.
    Remove {
        /// Image references.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Print the list.
    List {
        /// Print text or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
}

/// `herdctl pki ...`
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make the site's two CAs (refused if the directory already holds one) and a first admin credential.
    Init {
        /// The site's name (in the CAs' names).
        #[arg(long, default_value = "herd")]
        site: String,
        /// The first admin's name: a credential for `operator:NAME` (role admin) is written to DIR/credentials/NAME.
        #[arg(long, default_value = "admin")]
        admin: String,
    },
    /// Issue a certificate (and its key) into a credential directory.
    Issue {
        /// What it is for.
        #[arg(value_enum)]
        kind: IssueKind,
        /// Who: an operator's, machine's or member's name (1-63 of a-z, 0-9, '-').
        name: String,
        /// An operator's role.
        #[arg(long, default_value = "read-only", value_parser = parse_role)]
        role: herd_pki::Role,
        /// IP addresses the certificate names (members and servers: what clients dial).
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<std::net::IpAddr>,
        /// DNS names the certificate names.
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// Days it is valid [default: operators 90, machines 7, members and servers 365].
        #[arg(long)]
        days: Option<u32>,
        /// Where to write it [default: DIR/credentials/NAME].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Make a bearer token for automation (printed once, never stored) and add its hash to a tokens file that
    /// the provisioner reads (--api-tokens).
    Token {
        /// The token's name (logged and in timelines as token:NAME).
        name: String,
        /// Its role.
        #[arg(long, default_value = "read-only", value_parser = parse_role)]
        role: herd_pki::Role,
        /// The tokens file [default: DIR/api-tokens.toml].
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Both CAs and each holder's newest certificate, with expiries (soonest first).
    Status {
        /// Also every certificate a newer one replaced (renewals, rejoins): the whole of `DIR/issued/`.
        #[arg(long)]
        all: bool,
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Rotate the site's etcd CA on the running cluster, without losing the quorum: the provisioner (an admin's
    /// credential) makes a new CA, every registered machine learns to trust it (each etcd member restarts in its
    /// turn), the new CA issues and every machine renews from it, then the old CA is dropped (members restart once
    /// more). Follows it to the end (a progress line says what it waits for); `--status` only shows where it
    /// stands. Operator credentials issued before it are refused once it ends: issue them again
    /// (`herdctl pki issue operator NAME`).
    Rotate {
        /// Base URL of the provisioner's operator API (HTTPS; with --credentials DIR or HERD_API_TOKEN).
        #[arg(long, env = "HERD_PROVISIONER", default_value = "https://127.0.0.1:8443")]
        provisioner: String,
        /// Only show where the rotation stands; begin nothing.
        #[arg(long)]
        status: bool,
        /// Begin it and return at once (`--status` follows it later).
        #[arg(long, conflicts_with = "status")]
        no_wait: bool,
        /// How long to follow it before giving up (the rotation goes on in the provisioner).
        #[arg(long, default_value_t = 30)]
        timeout_mins: u64,
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Remove from `DIR/issued/` the copies of certificates that ended long ago and that a newer certificate of
    /// the same holder replaced (each holder's newest stays). Every renewal leaves a copy; `status` and the
    /// provisioner's expiry gauges read them all. Safe to run from cron: an ended certificate authenticates nothing.
    Prune {
        /// Only certificates that ended at least this many days ago.
        #[arg(long, default_value_t = 30)]
        ended_days: u32,
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
}

fn parse_role(s: &str) -> Result<herd_pki::Role, String> {
    s.parse()
}

/// What `herdctl pki issue` issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IssueKind {
    /// A person's or a tool's credential for etcd and herd's APIs (both CAs), with a role.
    Operator,
    /// A machine's etcd client certificate (machines normally get theirs when they join).
    Machine,
    /// An etcd member's peer and server certificate.
    Member,
    /// A server certificate for herd's APIs (the provisioner).
    Server,
}

/// `herdctl access ...`
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Make etcd's users and roles what the inventory and the issued operator certificates say, and turn etcd's
    /// authentication on (needs an admin credential). Run again after editing the inventory or issuing.
    Apply {
        /// The inventory file.
        #[arg(long, env = "HERD_INVENTORY", value_name = "FILE")]
        inventory: PathBuf,
        /// The site PKI's directory (its issued operator certificates become etcd users).
        #[arg(long, env = "HERD_PKI_DIR", default_value = "/var/lib/herd/pki")]
        pki: PathBuf,
    },
}

/// `herdctl machine ...`
#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// List machines with their state and latest boot event.
    List {
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Show one machine: addresses, MACs, state.
    Show {
        /// The machine's name.
        name: String,
        /// Print text or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// The machine's boot timeline: every DHCP, TFTP, HTTP and phone-home step, timestamped, and what the cluster
    /// saw (registered, suspect, dead, back) when etcd can be reached.
    Timeline {
        /// The machine's name.
        name: String,
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Make the machine install again on its next boot.
    Reprovision {
        /// The machine's name.
        name: String,
    },
    /// Approve a machine's keys (a provisioner started with `--join approve`): compare FINGERPRINT with the one the
    /// machine shows on its console ("waiting for an admin to approve") and with its timeline's `join-awaiting`
    /// event first. Needs an admin credential. Approved keys join again at later boots without asking.
    Approve {
        /// The machine's name.
        name: String,
        /// The fingerprint of its keys (colon-separated hex, as shown).
        fingerprint: String,
    },
    /// Stop placing new units on a machine (what runs there stays). Uses the cluster (--endpoint).
    Cordon {
        /// The machine id.
        name: String,
    },
    /// Make a cordoned or drained machine schedulable again.
    Uncordon {
        /// The machine id.
        name: String,
    },
    /// Cordon a machine and move its units away (blocks until they run elsewhere unless --no-block).
    Drain {
        /// The machine id.
        name: String,
        /// Return without waiting.
        #[arg(long)]
        no_block: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

/// The format `config render` prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ConfigFormat {
    /// Ignition 3.3.0 JSON (what the provisioner serves).
    #[default]
    Ignition,
    /// The same config as a CoreOS #cloud-config.
    CloudConfig,
}

/// `herdctl config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the config (Ignition 3.3.0) the provisioner serves to MACHINE.
    Render {
        /// The inventory file.
        #[arg(long, short = 'i', value_name = "FILE")]
        inventory: PathBuf,
        /// The machine's name.
        #[arg(value_name = "MACHINE")]
        machine: String,
        /// Ignition JSON, or the same config as a #cloud-config for machines still on CoreOS-style cloud-init.
        #[arg(long, short = 'f', value_enum, default_value_t)]
        format: ConfigFormat,
        /// The config of a provisioner with a site PKI (`--site-pki`): etcd over mutual TLS. Without the join
        /// credential and CA certificates, which the provisioner adds per boot.
        #[arg(long)]
        etcd_tls: bool,
    },
    /// Translate a legacy CoreOS #cloud-config (hostname, users, ssh_authorized_keys, write_files, coreos.units,
    /// coreos.etcd2) into Ignition 3.3.0. Keys it cannot translate are refused by name.
    Translate {
        /// The cloud-config file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Check an Ignition config for foot-guns ignition-validate misses: decimal-looking modes, duplicate paths,
    /// enabled units without [Install], remote sources without a hash, relative paths.
    ///
    /// Prints JSON-PATH: RULE: MESSAGE per finding; exits 0 when clean, 1 with findings, 2 when unreadable.
    Lint {
        /// The Ignition config (JSON).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// How listings are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Text,
    /// JSON for scripts.
    Json,
}

impl Output {
    /// Prints `value` as pretty JSON if that is the format asked for; says whether it did (the caller prints its
    /// text otherwise).
    pub(crate) fn json<T: serde::Serialize + ?Sized>(self, value: &T) -> anyhow::Result<bool> {
        if self == Output::Json {
            println!("{}", serde_json::to_string_pretty(value)?);
        }
        Ok(self == Output::Json)
    }
}

/// `herdctl demo ...`
#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Bring the demo up (the default).
    Up,
    /// Stop the VMs, the provisioner and the registry; remove the namespace and the demo's files.
    Down,
    /// Cut a machine's power (its disk stays): watch its units move.
    PowerOff {
        /// The machine, e.g. node2.
        name: String,
    },
    /// Power a machine on again: it PXE-boots into its installed slot and rejoins.
    PowerOn {
        /// The machine.
        name: String,
    },
}

/// What the demo runs and where it keeps its files.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The demo's files: state, disks, serial consoles, logs, SSH key.
    #[arg(long, global = true, env = "HERD_DEMO_DIR", default_value = "/var/tmp/herd-demo", value_name = "DIR")]
    pub dir: PathBuf,
    /// The inventory of the demo's machines.
    #[arg(long, global = true, default_value = "examples/qemu-3.toml", value_name = "FILE")]
    pub inventory: PathBuf,
    /// The image manifest.
    #[arg(long, global = true, default_value = "images/herd-os.toml", value_name = "FILE")]
    pub manifest: PathBuf,
    /// The image build cache.
    #[arg(long, global = true, env = "HERD_IMAGE_CACHE", default_value = "/var/cache/herd/images", value_name = "DIR")]
    pub image_cache: PathBuf,
    /// Timestamp of every file in the image.
    #[arg(long, global = true, env = "SOURCE_DATE_EPOCH", default_value_t = 1_767_225_600)]
    pub source_date_epoch: u64,
    /// The static node-init the image carries (scripts/build-node-init.sh builds it).
    #[arg(
        long,
        global = true,
        env = "HERD_NODE_INIT",
        default_value = "target/x86_64-unknown-linux-gnu/release/node-init",
        value_name = "FILE"
    )]
    pub node_init: PathBuf,
    /// The provisioner binary [default: `provisioner` next to herdctl].
    #[arg(long, global = true, value_name = "FILE")]
    pub provisioner_bin: Option<PathBuf>,
}

/// `herdctl inventory ...`
#[derive(Debug, Subcommand)]
pub enum InventoryCommand {
    /// Validate inventory files; print every problem as FILE:LINE:COL: RULE: MESSAGE.
    ///
    /// Exits 0 when every file is valid, 1 when any has problems, 2 when a file cannot be read.
    Check {
        /// Inventory files to check.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print problems as text or as a JSON array.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// List the machines of an inventory.
    Show {
        /// The inventory file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print a table or JSON (with each machine's effective labels and FQDN).
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Print a realistic generated inventory (racks, bonded NIC pairs, internal and external networks).
    Gen {
        /// Number of machines.
        #[arg(long, short = 'n')]
        machines: usize,
        /// Number of racks [default: one per 40 machines].
        #[arg(long)]
        racks: Option<usize>,
        /// Number of masters (etcd members): 1, 3 or 5.
        #[arg(long, default_value_t = 3)]
        masters: usize,
    },
    /// Show what changing OLD into NEW would change: machines added, removed and changed, field by field, with
    /// what applying each machine's change takes (metadata only, reboot, reprovision).
    Diff {
        /// The inventory as it is applied now.
        #[arg(value_name = "OLD")]
        old: PathBuf,
        /// The proposed inventory.
        #[arg(value_name = "NEW")]
        new: PathBuf,
        /// Print the plan as text or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
        /// Exit with status 1 when there are differences (like `git diff --exit-code`).
        #[arg(long)]
        exit_code: bool,
    },
}
