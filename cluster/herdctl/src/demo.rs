//! `herdctl demo [up|down|power-off|power-on]`: a QEMU cluster booted by the provisioner, on this host.
//!
//! `up` builds the image (cached), makes network namespace `herd-demo` with a bridge (the provisioner at
//! 10.99.0.2, a local registry at 10.99.0.2:5000) joined to this host by a veth pair (10.99.0.1 here), starts the
//! provisioner and the registry there, boots the inventory's machines (TCG; `herd.io/firmware=uefi` boots OVMF,
//! others SeaBIOS) which PXE-boot, install, form etcd and register, then runs a `[Container]` web server and a
//! global unit and prints the cluster. Everything it starts is recorded in `DIR/demo.json` as it starts, so
//! `down` (and a failed or interrupted `up`) stops all of it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use herd_inventory::EtcdRole;
use herd_lab::qemu::{DEBIAN_IPXE_DIR, Firmware, OVMF_CODE, VmSpec};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::cli::{ClusterArgs, DemoArgs, Output};
use crate::unit_cmd::Cluster;

/// The demo's network namespace (and the host side of its veth pair).
pub(crate) const NETNS: &str = "herd-demo";
const BRIDGE: &str = "br0";
/// The provisioner's and the registry's address on the demo bridge.
const SERVICES_IP: &str = "10.99.0.2";
/// This host's address on the demo network.
const HOST_CIDR: &str = "10.99.0.1/24";
/// The web server's image, as pushed to the demo registry.
const WEB_IMAGE: &str = "herd/web";
const WEB_TAG: &str = "1";
/// The port the web unit publishes on its machine.
const WEB_PORT: u16 = 8080;
/// What node-init prints once the machine is registered.
const REGISTERED: &str = "herd-node-init: registered";
const BOOT_LIMIT: Duration = Duration::from_secs(900);

/// What the demo started, saved as it starts it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Processes by role (`provisioner`, `registry`, `vm:NAME`).
    procs: Vec<Proc>,
    machines: Vec<DemoMachine>,
    endpoints: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Proc {
    role: String,
    pid: u32,
    /// A word of its command line, checked before signalling (the pid may have been reused).
    exe: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DemoMachine {
    name: String,
    address: String,
    uefi: bool,
    macs: Vec<String>,
}

/// The summary `up -o json` prints.
#[derive(Debug, Serialize)]
struct Summary {
    wall_s: f64,
    endpoints: Vec<String>,
    provisioner: String,
    /// The admin credential for the operator API (`HERD_CREDENTIALS`).
    credentials: PathBuf,
    registry: String,
    ssh_identity: PathBuf,
    machines: Vec<MachineFigure>,
    web: WebFigure,
}

#[derive(Debug, Serialize)]
struct MachineFigure {
    name: String,
    firmware: &'static str,
    registered_s: f64,
}

#[derive(Debug, Serialize)]
struct WebFigure {
    machine: String,
    url: String,
    body: String,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("demo.json")
}

fn load_state(dir: &Path) -> anyhow::Result<State> {
    let path = state_path(dir);
    let text = std::fs::read(&path).with_context(|| format!("no demo in {} (herdctl demo up)", dir.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is damaged; remove it by hand", path.display()))
}

fn save_state(dir: &Path, state: &State) -> anyhow::Result<()> {
    let tmp = dir.join("demo.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, state_path(dir))?;
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netns_exists() -> bool {
    Path::new("/run/netns").join(NETNS).exists()
}

/// Everything `up` needs that is not there, each with what to do about it.
fn missing_prerequisites(args: &DemoArgs) -> Vec<String> {
    let mut missing = Vec::new();
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2).map(str::to_owned)))
        .flatten();
    if uid.as_deref() != Some("0") {
        missing.push("root: the demo makes a network namespace, taps and a veth pair (run it with sudo)".to_owned());
    }
    let tools = [
        ("qemu-system-x86_64", "apt install -t bookworm-backports qemu-system-x86"),
        ("qemu-img", "apt install qemu-utils"),
        ("ip", "apt install iproute2"),
        ("ethtool", "apt install ethtool"),
        ("docker-registry", "apt install docker-registry"),
        ("ssh-keygen", "apt install openssh-client"),
        ("mksquashfs", "apt install squashfs-tools"),
        ("veritysetup", "apt install cryptsetup-bin"),
        ("mmdebstrap", "apt install mmdebstrap"),
    ];
    for (tool, fix) in tools {
        if !on_path(tool) {
            missing.push(format!("{tool}: {fix}"));
        }
    }
    if !Path::new(OVMF_CODE).exists() {
        missing.push(format!("{OVMF_CODE}: apt install ovmf"));
    }
    if !Path::new(DEBIAN_IPXE_DIR).join("undionly.kpxe").exists() {
        missing.push(format!("{DEBIAN_IPXE_DIR}/undionly.kpxe: apt install ipxe"));
    }
    if !Path::new("/usr/share/qemu/efi-virtio.rom").exists() && !Path::new("/usr/lib/ipxe/qemu").exists() {
        missing.push("QEMU's iPXE option ROMs: apt install ipxe-qemu".to_owned());
    }
    if !args.node_init.is_file() {
        missing.push(format!("{}: the static node-init (scripts/build-node-init.sh)", args.node_init.display()));
    }
    let provisioner = args.provisioner_bin.clone().unwrap_or_default();
    if !provisioner.is_file() {
        missing.push(format!(
            "{}: the provisioner (cargo build --release -p herd-provisioner, or --provisioner-bin FILE)",
            provisioner.display()
        ));
    }
    if !args.inventory.is_file() {
        missing.push(format!("{}: the demo's inventory (--inventory FILE)", args.inventory.display()));
    }
    missing
}

fn spinner(mp: &MultiProgress, message: &str) -> ProgressBar {
    let bar = mp.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:<12} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn done(bar: &ProgressBar, message: String) {
    bar.set_style(
        ProgressStyle::with_template("✔ {prefix:<12} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.finish_with_message(message);
}

/// Polls `f` every 250 ms until it gives a value, for at most `limit`.
fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("{what}: nothing after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Starts `argv` inside the demo namespace, detached from this terminal, its output in `DIR/LOG`; records it.
fn spawn_in_netns(dir: &Path, state: &mut State, role: &str, argv: &[String], log: &str) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt as _;
    let out = std::fs::File::create(dir.join(log))?;
    let child = Command::new("ip")
        .args(["netns", "exec", NETNS])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own process group: Ctrl-C in this terminal goes to herdctl, which tears down in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", argv[0]))?;
    let exe = Path::new(&argv[0]).file_name().map_or_else(|| argv[0].clone(), |n| n.to_string_lossy().into_owned());
    state.procs.push(Proc { role: role.to_owned(), pid: child.id(), exe });
    save_state(dir, state)?;
    Ok(child.id())
}

/// Whether a recorded process still runs: it exists, is not a zombie (an exited child not yet reaped), and is
/// what was started (its command line names it; empty while `ip netns exec` is between exec calls).
fn alive(p: &Proc) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)) else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if state == Some("Z") {
        return false;
    }
    std::fs::read(format!("/proc/{}/cmdline", p.pid))
        .is_ok_and(|c| c.is_empty() || c.split(|b| *b == 0).any(|w| String::from_utf8_lossy(w).ends_with(&p.exe)))
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).output();
}

/// Stops a recorded process: `hard` is a power cut (SIGKILL at once), else SIGTERM and 10 s to go.
fn stop(p: &Proc, hard: bool) {
    if !alive(p) {
        return;
    }
    kill(p.pid, if hard { "KILL" } else { "TERM" });
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(p) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(p) {
        kill(p.pid, "KILL");
    }
}

/// Stops everything the demo started and removes its network; `keep` keeps DIR (logs) for a failed `up`.
fn teardown(dir: &Path, keep: bool) -> anyhow::Result<()> {
    if let Ok(state) = load_state(dir) {
        for p in state.procs.iter().rev() {
            stop(p, p.role.starts_with("vm:"));
        }
    }
    if netns_exists() {
        // Anything else still running in the namespace (started between a spawn and its record).
        if let Ok(pids) = run("ip", &["netns", "pids", NETNS]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                kill(pid, "KILL");
            }
        }
        run("ip", &["netns", "del", NETNS])?;
    }
    // The host end of the veth pair goes with its peer; this covers a namespace deleted by hand.
    let _ = run("ip", &["link", "del", NETNS]);
    if !keep && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// `herdctl demo down`.
pub(crate) fn down(dir: &Path) -> anyhow::Result<ExitCode> {
    if !dir.exists() && !netns_exists() {
        println!("no demo is running (nothing in {}, no namespace {NETNS})", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    teardown(dir, false)?;
    println!("demo stopped: VMs, provisioner and registry stopped, namespace {NETNS} and {} removed", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `herdctl demo up`.
pub(crate) fn up(args: &DemoArgs, output: Output) -> anyhow::Result<ExitCode> {
    let missing = missing_prerequisites(args);
    if !missing.is_empty() {
        eprintln!("herdctl demo: missing prerequisites (scripts/setup-host.sh installs the packages):");
        for m in &missing {
            eprintln!("  - {m}");
        }
        return Ok(ExitCode::from(2));
    }
    if state_path(&args.dir).exists() || netns_exists() {
        bail!("a demo is already running (state in {}); stop it first: herdctl demo down", args.dir.display());
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    save_state(&args.dir, &State::default())?;
    let dir = args.dir.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let signalled = rt.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return tokio::signal::ctrl_c().await.is_ok();
            };
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.is_ok(),
                t = term.recv() => t.is_some(),
            }
        });
        if signalled {
            eprintln!("\nherdctl demo: interrupted; stopping everything it started");
            let _ = teardown(&dir, true);
            std::process::exit(130);
        }
    });
    match bring_up(args, output) {
        Ok(code) => Ok(code),
        Err(e) => {
            let _ = teardown(&args.dir, true);
            Err(e.context(format!(
                "the demo did not come up; everything it started is stopped, its logs are in {} \
                 (herdctl demo down removes them)",
                args.dir.display()
            )))
        }
    }
}

fn bring_up(args: &DemoArgs, output: Output) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let dir = args.dir.canonicalize()?;
    let mut state = State::default();
    let mp = MultiProgress::new();
    if output == Output::Json {
        mp.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }

    // The image (cached by content).
    let bar = spinner(&mp, "building herd-os (cached after the first time)");
    bar.set_prefix("image");
    let manifest = herd_images::manifest::load(&args.manifest).map_err(|e| anyhow::anyhow!("{e}"))?;
    let opts = herd_images::build::BuildOptions {
        out: dir.join("image"),
        cache: args.image_cache.clone(),
        epoch: args.source_date_epoch,
        no_cache: false,
        node_init: args.node_init.clone(),
    };
    let built = herd_images::build::build(&manifest, &opts, &|stage| bar.set_message(stage.describe()))
        .with_context(|| format!("building {}", args.manifest.display()))?;
    let how = if built.cached { "from the cache" } else { "built" };
    done(&bar, format!("{} {} {how}", built.manifest.name, built.manifest.release));

    // A key for `herdctl ssh/status/journal`, and the inventory with it.
    let bar = spinner(&mp, "inventory and SSH key");
    bar.set_prefix("inventory");
    let key = dir.join("id_ed25519");
    run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", "herd-demo", "-f", &key.display().to_string()])?;
    let public = std::fs::read_to_string(dir.join("id_ed25519.pub"))?;
    let text = std::fs::read_to_string(&args.inventory)?;
    let with_key =
        text.replacen("ssh_authorized_keys = [\n", &format!("ssh_authorized_keys = [\n  \"{}\",\n", public.trim()), 1);
    if with_key == text {
        bail!("{}: no `ssh_authorized_keys = [` line to add the demo's key to", args.inventory.display());
    }
    let inventory_path = dir.join("inventory.toml");
    std::fs::write(&inventory_path, &with_key)?;
    let inventory = herd_inventory::load(&inventory_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    for m in &inventory.machines {
        let role = inventory.roles.iter().find(|(n, _)| n.to_string() == m.role.get_ref().to_string());
        let member = role.is_some_and(|(_, r)| r.etcd == EtcdRole::Member);
        let address = m.internal.get_ref().to_string();
        if member {
            // etcd speaks mutual TLS: the provisioner holds the site PKI (`--site-pki`).
            state.endpoints.push(format!("https://{address}:2379"));
        }
        state.machines.push(DemoMachine {
            name: m.name.get_ref().to_string(),
            address,
            uefi: m.labels.iter().any(|(k, v)| k.as_str() == "herd.io/firmware" && v == "uefi"),
            macs: m.macs.get_ref().iter().map(|mac| mac.get_ref().to_string()).collect(),
        });
    }
    save_state(&dir, &state)?;
    done(
        &bar,
        format!("{} machines, {} etcd members, key {}", state.machines.len(), state.endpoints.len(), key.display()),
    );

    // The network: namespace, bridge, and a veth pair to this host.
    let bar = spinner(&mp, "namespace, bridge, veth");
    bar.set_prefix("network");
    herd_lab::qemu::bridge_netns(NETNS, BRIDGE, &[&format!("{SERVICES_IP}/24")])?;
    run("ip", &["link", "add", NETNS, "type", "veth", "peer", "name", "uplink", "netns", NETNS])?;
    run("ip", &["-n", NETNS, "link", "set", "uplink", "master", BRIDGE, "up"])?;
    run("ip", &["addr", "add", HOST_CIDR, "dev", NETNS])?;
    run("ip", &["link", "set", NETNS, "up"])?;
    done(&bar, format!("namespace {NETNS}, bridge {BRIDGE}; this host is {HOST_CIDR} on interface {NETNS}"));

    // The site PKI: the provisioner's operator API certificate and the demo's admin credential.
    let services_ip: std::net::IpAddr = SERVICES_IP.parse()?;
    let pki = herd_lab::pki::LabPki::make(&dir.join("pki"), services_ip)?;

    // The provisioner.
    let bar = spinner(&mp, "starting");
    bar.set_prefix("provisioner");
    let argv: Vec<String> = [
        args.provisioner_bin.clone().unwrap_or_default().display().to_string(),
        "--inventory".into(),
        inventory_path.display().to_string(),
        "--interface".into(),
        BRIDGE.into(),
        "--state-dir".into(),
        dir.join("provisioner-state").display().to_string(),
        "--assets".into(),
        dir.join("image").display().to_string(),
        "--api-credentials".into(),
        pki.server.display().to_string(),
        "--site-pki".into(),
        dir.join("pki").display().to_string(),
    ]
    .into();
    let pid = spawn_in_netns(&dir, &mut state, "provisioner", &argv, "provisioner.log")?;
    let provisioner = format!("https://{SERVICES_IP}:8443");
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(2))).build(),
    );
    poll(Duration::from_secs(20), "the provisioner's HTTP port", || {
        if !alive(&state.procs[0]) {
            bail!("the provisioner exited: {}", tail(&dir.join("provisioner.log")));
        }
        Ok(agent.get(&format!("http://{SERVICES_IP}/metrics")).call().is_ok().then_some(()))
    })?;
    done(&bar, format!("http://{SERVICES_IP} (pid {pid}): DHCP, TFTP, HTTP on {BRIDGE}; operator API {provisioner}"));

    // The registry, and the web server's image in it.
    let bar = spinner(&mp, "starting docker-registry");
    bar.set_prefix("registry");
    let registry = format!("{SERVICES_IP}:5000");
    let config = dir.join("registry.yml");
    std::fs::write(&config, herd_lab::local::registry_config(&dir.join("registry"), &registry))?;
    let argv = vec!["docker-registry".to_owned(), "serve".into(), config.display().to_string()];
    spawn_in_netns(&dir, &mut state, "registry", &argv, "registry.log")?;
    poll(Duration::from_secs(20), "the registry", || {
        Ok(agent.get(&format!("http://{registry}/v2/")).call().is_ok().then_some(()))
    })?;
    bar.set_message(format!("pushing {WEB_IMAGE}:{WEB_TAG}"));
    let web_image = publish_web_image(&agent, &registry, &dir)?;
    done(&bar, format!("http://{registry} serves {web_image}"));

    // The machines.
    let mut bars = Vec::new();
    for m in &state.machines {
        let bar = spinner(&mp, "powering on");
        bar.set_prefix(m.name.clone());
        bars.push(bar);
    }
    let mut boot_started = Vec::new();
    for i in 0..state.machines.len() {
        let m = state.machines[i].clone();
        power_on_machine(&dir, &mut state, &m)?;
        boot_started.push(Instant::now());
    }
    let cluster_args = cluster_args(&state, &dir);
    let api = crate::machine_cmd::Api::new(&provisioner, &cluster_args)?;
    let mut registered: Vec<Option<f64>> = vec![None; state.machines.len()];
    poll(BOOT_LIMIT, "every machine registered", || {
        // Progress only: a provisioner that does not answer this round is asked again the next.
        let summaries = api.client().machines().unwrap_or_default();
        for (i, m) in state.machines.iter().enumerate() {
            if registered[i].is_some() {
                continue;
            }
            let console = std::fs::read_to_string(dir.join(format!("{}.serial.log", m.name))).unwrap_or_default();
            if console.contains(REGISTERED) {
                let took = boot_started[i].elapsed().as_secs_f64();
                registered[i] = Some(took);
                done(
                    &bars[i],
                    format!("registered {took:.0} s after power-on ({})", if m.uefi { "UEFI" } else { "BIOS" }),
                );
                continue;
            }
            if let Some(line) = console.lines().find(|l| l.contains("BOOT STOPPED")) {
                bail!("{}: {}", m.name, line.trim());
            }
            let vm = state.procs.iter().find(|p| p.role == format!("vm:{}", m.name));
            if vm.is_some_and(|p| !alive(p)) {
                bail!("{}'s VM exited: {}", m.name, tail(&dir.join(format!("{}.qemu.log", m.name))));
            }
            if let Some(last) = summaries.iter().find(|s| s.name == m.name).and_then(|s| s.last.as_ref()) {
                bars[i].set_message(format!("{} {}", last.event, last.detail));
            }
        }
        Ok(registered.iter().all(Option::is_some).then_some(()))
    })?;
    save_state(&dir, &state)?;

    // Least privilege in etcd: every machine and operator its own user and role, authentication on.
    let bar = spinner(&mp, "connecting to etcd");
    bar.set_prefix("etcd");
    let cluster = Cluster::connect(&cluster_args)?;
    let policy = crate::pki_cmd::policy(&inventory_path, &dir.join("pki"))?;
    cluster.block_on(herd_cluster::access::apply(cluster.store(), &policy))?;
    done(
        &bar,
        format!(
            "mutual TLS; users and roles for {} machines and {} operators; authentication on",
            policy.machines.len(),
            policy.operators.len()
        ),
    );

    // The work: a container and a global unit.
    let bar = spinner(&mp, "pre-warming");
    bar.set_prefix("units");

    // Pre-warm: the web image on every machine before any work lands (a unit that moves then starts at once).
    bar.set_message(format!("pre-warming {web_image} on every machine"));
    cluster.prewarm(&web_image)?;
    let mut warm = std::collections::BTreeSet::new();
    poll(Duration::from_secs(300), "the web image pre-warmed on every machine", || {
        for m in &state.machines {
            if !warm.contains(&m.name) && cluster.has_image(&m.name, &web_image).unwrap_or(false) {
                warm.insert(m.name.clone());
            }
        }
        bar.set_message(format!("pre-warming {web_image}: {}/{} machines", warm.len(), state.machines.len()));
        Ok((warm.len() == state.machines.len()).then_some(()))
    })?;
    bar.set_message("submitting web.service ([Container]) and hello.service (global)");
    let web = format!(
        "[Unit]\nDescription=the demo's web server ({web_image})\n[Container]\nImage={web_image}\n\
         Command=/bin/httpd -f -p 80 -h /www\nPort={WEB_PORT}:80\n[X-Fleet]\nMemory=64M\nCPU=250m\n"
    );
    let hello = "[Unit]\nDescription=says hello on every machine\n[Service]\nType=oneshot\nRemainAfterExit=yes\n\
                 StandardOutput=journal+console\nExecStart=/bin/sh -c 'echo hello from $(hostname), placed by herd'\n\
                 [X-Fleet]\nGlobal=true\n";
    for (name, text) in [("web.service", web.as_str()), ("hello.service", hello)] {
        cluster.launch(name, text, Duration::from_secs(300))?;
    }
    let web_machine = cluster.placed_on("web.service")?;
    let web_address =
        state.machines.iter().find(|m| m.name == web_machine).map_or(String::new(), |m| m.address.clone());
    let url = format!("http://{web_address}:{WEB_PORT}/");
    bar.set_message(format!("waiting for {url}"));
    let body = poll(Duration::from_secs(60), &format!("an answer from {url}"), || {
        Ok(agent.get(&url).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok()))
    })?;
    done(
        &bar,
        format!(
            "{web_image} pre-warmed everywhere; web.service on {web_machine} answers {url}; hello.service on every machine"
        ),
    );
    let wall = started.elapsed().as_secs_f64();
    drop(mp);

    if output == Output::Json {
        let summary = Summary {
            wall_s: wall,
            endpoints: state.endpoints.clone(),
            provisioner,
            credentials: pki.admin.clone(),
            registry,
            ssh_identity: key,
            machines: state
                .machines
                .iter()
                .zip(&registered)
                .map(|(m, t)| MachineFigure {
                    name: m.name.clone(),
                    firmware: if m.uefi { "uefi" } else { "bios" },
                    registered_s: t.unwrap_or_default(),
                })
                .collect(),
            web: WebFigure { machine: web_machine, url, body },
        };
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    let endpoint = state.endpoints.join(",");
    writeln!(out, "\nThe demo cluster is up ({wall:.0} s).\n")?;
    writeln!(out, "$ herdctl list-machines")?;
    drop(out);
    cluster.list_machines(Output::Text)?;
    println!("\n$ herdctl list-units");
    cluster.list_units(Output::Text)?;
    for m in &state.machines {
        println!("\n$ herdctl machine timeline {}", m.name);
        api.timeline(&m.name, &cluster_args, Output::Text)?;
    }
    println!("\n$ curl {url}\n{}", body.trim_end());
    println!(
        "\nTry next (as root, from this host):\n  \
         export HERD_ENDPOINT={endpoint} HERD_PROVISIONER={provisioner} HERD_CREDENTIALS={} HERD_SSH_IDENTITY={}\n  \
         herdctl list-units; herdctl journal hello.service; herdctl status web.service\n  \
         herdctl demo power-off {web_machine}    # a power cut: web.service moves once the machine is declared dead\n  \
         herdctl machine timeline {web_machine}  # shows the death; herdctl demo power-on {web_machine} brings it back\n  \
         herdctl demo down                  # stops everything and removes {}",
        pki.admin.display(),
        key.display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The cluster flags that reach the demo's etcd and machines.
fn cluster_args(state: &State, dir: &Path) -> ClusterArgs {
    ClusterArgs {
        endpoint: state.endpoints.clone(),
        credentials: Some(dir.join("pki/credentials/admin")),
        ca_file: None,
        cert_file: None,
        key_file: None,
        tunnel: None,
        ssh_user: "herd".into(),
        ssh_port: 22,
        ssh_identity: Some(dir.join("id_ed25519")),
        request_timeout: 5,
    }
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    format!("{} (see {})", lines.into_iter().rev().collect::<Vec<_>>().join(" | "), path.display())
}

/// Starts machine `m`'s VM (creating its disk the first time).
fn power_on_machine(dir: &Path, state: &mut State, m: &DemoMachine) -> anyhow::Result<()> {
    let disk = dir.join(format!("{}.qcow2", m.name));
    if !disk.exists() {
        herd_lab::qemu::qcow2(&disk)?;
    }
    let mut taps = Vec::new();
    for i in 0..m.macs.len() {
        let tap = format!("{}-{i}", m.name.chars().take(12).collect::<String>());
        if run("ip", &["-n", NETNS, "link", "show", &tap]).is_err() {
            herd_lab::qemu::add_tap(NETNS, BRIDGE, &tap)?;
        }
        taps.push(tap);
    }
    let firmware = if m.uefi { Firmware::OvmfIpxeRom } else { Firmware::SeabiosIpxe };
    let macs: Vec<&str> = m.macs.iter().map(String::as_str).collect();
    let spec = VmSpec::new(&m.name, firmware, &macs).with_disk(&disk).memory(1024);
    // The console of the boot before is kept aside: this boot's must not be read as if it had already happened.
    let serial = dir.join(format!("{}.serial.log", m.name));
    if serial.exists() {
        std::fs::rename(&serial, dir.join(format!("{}.serial.before.log", m.name)))?;
    }
    let mut argv = vec!["qemu-system-x86_64".to_owned()];
    argv.extend(herd_lab::qemu::pxe_qemu_args(&spec, dir, &taps)?);
    state.procs.retain(|p| p.role != format!("vm:{}", m.name));
    spawn_in_netns(dir, state, &format!("vm:{}", m.name), &argv, &format!("{}.qemu.log", m.name))?;
    Ok(())
}

/// `herdctl demo power-off NAME`: a power cut (the VM is killed; its disk stays).
pub(crate) fn power_off(dir: &Path, name: &str) -> anyhow::Result<ExitCode> {
    let mut state = load_state(dir)?;
    let role = format!("vm:{name}");
    let Some(p) = state.procs.iter().find(|p| p.role == role).cloned() else {
        bail!("no machine {name} in the demo; it has {}", names(&state));
    };
    if !alive(&p) {
        println!("{name} is already off");
        return Ok(ExitCode::SUCCESS);
    }
    stop(&p, true);
    state.procs.retain(|q| q.role != role);
    save_state(dir, &state)?;
    println!("{name}: powered off (its units move once its registration is gone and the grace period is over)");
    Ok(ExitCode::SUCCESS)
}

/// `herdctl demo power-on NAME`: boots the machine again (from the network, into its installed slot) and waits
/// until it is registered.
pub(crate) fn power_on(dir: &Path, name: &str, output: Output) -> anyhow::Result<ExitCode> {
    let mut state = load_state(dir)?;
    let Some(m) = state.machines.iter().find(|m| m.name == name).cloned() else {
        bail!("no machine {name} in the demo; it has {}", names(&state));
    };
    if state.procs.iter().any(|p| p.role == format!("vm:{name}") && alive(p)) {
        bail!("{name} is already on (herdctl demo power-off {name} first)");
    }
    let started = Instant::now();
    power_on_machine(dir, &mut state, &m)?;
    let bar = ProgressBar::new_spinner();
    if output == Output::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_message(format!("{name}: booting"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let serial = dir.join(format!("{name}.serial.log"));
    poll(BOOT_LIMIT, &format!("{name} registered"), || {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if let Some(line) = console.lines().find(|l| l.contains("BOOT STOPPED")) {
            bail!("{name}: {}", line.trim());
        }
        Ok(console.contains(REGISTERED).then_some(()))
    })?;
    bar.finish_and_clear();
    let took = started.elapsed().as_secs_f64();
    let installed = !std::fs::read_to_string(&serial).unwrap_or_default().contains("installing to");
    if output == Output::Json {
        println!("{}", serde_json::json!({"name": name, "registered_s": took, "reinstalled": !installed}));
    } else {
        let how = if installed { "from its installed slot" } else { "after installing" };
        println!("{name}: registered {took:.0} s after power-on, {how}");
    }
    Ok(ExitCode::SUCCESS)
}

fn names(state: &State) -> String {
    state.machines.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Makes the web server's image (static busybox's httpd and a page) and pushes it to `registry` through the
/// registry's HTTP API (Docker image manifest v2, one layer); returns its reference.
fn publish_web_image(agent: &ureq::Agent, registry: &str, dir: &Path) -> anyhow::Result<String> {
    let root = dir.join("web-root");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("www"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("no /bin/busybox (apt install busybox-static)")?;
    std::os::unix::fs::symlink("busybox", root.join("bin/httpd"))?;
    std::fs::write(root.join("www/index.html"), format!("hello from herd's demo: {WEB_IMAGE}:{WEB_TAG}\n"))?;
    let tar = dir.join("web-layer.tar");
    run(
        "tar",
        &[
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "-C",
            &root.display().to_string(),
            "-cf",
            &tar.display().to_string(),
            ".",
        ],
    )?;
    let plain = std::fs::read(&tar)?;
    run("gzip", &["-n", "-f", &tar.display().to_string()])?;
    let layer = std::fs::read(dir.join("web-layer.tar.gz"))?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/bin/httpd", "-f", "-p", "80", "-h", "/www"] },
        "rootfs": { "type": "layers", "diff_ids": [sha256(&plain)] },
    }))?;
    let base = format!("http://{registry}/v2/{WEB_IMAGE}");
    for blob in [&layer, &config] {
        let resp = agent.post(&format!("{base}/blobs/uploads/")).send_empty().context("starting a blob upload")?;
        let location = resp.headers().get("location").and_then(|l| l.to_str().ok()).context("no upload location")?;
        let location =
            if location.starts_with('/') { format!("http://{registry}{location}") } else { location.to_owned() };
        let sep = if location.contains('?') { '&' } else { '?' };
        agent
            .put(&format!("{location}{sep}digest={}", sha256(blob)))
            .header("content-type", "application/octet-stream")
            .send(&blob[..])
            .context("uploading a blob")?;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": { "mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": sha256(&config) },
        "layers": [{ "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer.len(), "digest": sha256(&layer) }],
    });
    agent
        .put(&format!("{base}/manifests/{WEB_TAG}"))
        .header("content-type", "application/vnd.docker.distribution.manifest.v2+json")
        .send(&serde_json::to_vec(&manifest)?[..])
        .context("pushing the manifest")?;
    Ok(format!("{registry}/{WEB_IMAGE}:{WEB_TAG}"))
}
