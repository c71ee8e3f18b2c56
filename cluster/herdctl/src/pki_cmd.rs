//! `herdctl pki init|issue|token|status|prune` (the site PKI, herd-pki) and `herdctl access apply` (etcd's users and roles,
//! `herd_cluster::access`).
//!
//! A credential is a directory: `etcd-ca.crt` `etcd.crt` `etcd.key` for etcd, `api-ca.crt` `api.crt` `api.key`
//! for herd's APIs (an operator's holds both; a machine's or a member's the etcd part, a server's the api part).
//! `--credentials DIR` (or `HERD_CREDENTIALS`) points herdctl at one.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use herd_cluster::access::{self, Policy};
use herd_cluster::store::TlsFiles;
use herd_pki::{Authority, Holder, Role, Site, Standing, Subject};
use time::OffsetDateTime;

use crate::cli::{ClusterArgs, IssueKind, Output};
use crate::table;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// `herdctl pki init`.
pub(crate) fn init(dir: &Path, site: &str, admin: &str) -> anyhow::Result<ExitCode> {
    let pki = Site::init(dir, site, now())?;
    for a in Authority::ALL {
        println!("{a} CA: {} (valid until {})", pki.ca_info(a).fingerprint, date(pki.ca_info(a).not_after));
    }
    let out = dir.join("credentials").join(admin);
    write_credential(&pki, &Holder::Operator(admin.to_owned(), Role::Admin), &[], &[], None, &out)?;
    println!("admin credential operator:{admin}: {}", out.display());
    println!(
        "next: start etcd with mutual TLS (docs/security.md), then `herdctl --credentials {} access apply --inventory \
         FILE`",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `herdctl pki issue`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue(
    dir: &Path,
    kind: IssueKind,
    name: &str,
    role: Role,
    ips: &[std::net::IpAddr],
    dns: &[String],
    days: Option<u32>,
    out: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let pki = Site::open(dir)?;
    let holder = match kind {
        IssueKind::Operator => Holder::Operator(name.to_owned(), role),
        IssueKind::Machine => Holder::Machine(name.to_owned()),
        IssueKind::Member => Holder::Member(name.to_owned()),
        IssueKind::Server => Holder::Server(name.to_owned()),
    };
    let out = out.map_or_else(|| dir.join("credentials").join(name), Path::to_owned);
    write_credential(&pki, &holder, ips, dns, days, &out)?;
    println!("{holder}: {}", out.display());
    if kind == IssueKind::Operator {
        println!("next: `herdctl access apply` makes {holder} an etcd user with role {role}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Issues `holder`'s credential (validity: `days`, or the kind's default) into `out`.
fn write_credential(
    pki: &Site,
    holder: &Holder,
    ips: &[std::net::IpAddr],
    dns: &[String],
    days: Option<u32>,
    out: &Path,
) -> anyhow::Result<()> {
    let default_days = match holder {
        Holder::Operator(..) => 90,
        Holder::Machine(_) => 7,
        Holder::Member(_) | Holder::Server(_) => 365,
    };
    let validity = time::Duration::days(days.map_or(default_days, i64::from));
    let subject = Subject { holder: holder.clone(), dns: dns.to_vec(), ips: ips.to_vec(), validity };
    herd_pki::write_credential(pki, &subject, out, now())?;
    Ok(())
}

/// `herdctl pki token`: a new random token, printed once; its hash is added to the tokens file (made if missing).
pub(crate) fn token(dir: &Path, name: &str, role: Role, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(herd_pki::is_name(name), "token name {name:?}: use 1-63 of a-z, 0-9 and '-'");
    let path = file.map_or_else(|| dir.join("api-tokens.toml"), Path::to_owned);
    let mut text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "version = 1\n".to_owned(),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
    };
    if text.contains(&format!("name = \"{name}\"\n")) {
        anyhow::bail!("{} already has a token named {name}: pick another name (or remove its entry)", path.display());
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    text.push_str(&format!(
        "\n[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
        herd_api::token_hash(&token)
    ));
    herd_pki::write_public(&path, text.as_bytes())?;
    eprintln!(
        "token:{name} ({role}) added to {}; restart the provisioner with --api-tokens {} to accept it. The token \
         (shown once, keep it secret; clients send it as HERD_API_TOKEN):",
        path.display(),
        path.display()
    );
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// The etcd TLS files of `args`: a credential directory's parts (for `https://` endpoints: a credential also
/// serves the provisioner's API when etcd itself runs without TLS), each overridden by its own flag.
pub(crate) fn etcd_tls(args: &ClusterArgs) -> anyhow::Result<TlsFiles> {
    let tls_endpoints = args.endpoint.iter().any(|e| e.starts_with("https://"));
    let part = |flag: &Option<String>, file: &str| -> Option<String> {
        let from_dir = args.credentials.as_ref().filter(|_| tls_endpoints).map(|d| d.join(file).display().to_string());
        flag.clone().or(from_dir)
    };
    let tls = TlsFiles {
        ca: part(&args.ca_file, "etcd-ca.crt"),
        cert: part(&args.cert_file, "etcd.crt"),
        key: part(&args.key_file, "etcd.key"),
    };
    if let Some(key) = &tls.key {
        herd_pki::check_private(Path::new(key))?;
    }
    Ok(tls)
}

#[derive(serde::Serialize)]
struct Line<'a> {
    authority: Authority,
    standing: Standing,
    #[serde(flatten)]
    cert: &'a herd_pki::CertInfo,
    days_left: i64,
    /// A rotation's `next` or `previous` CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    rotation: Option<&'static str>,
}

/// `herdctl pki status`.
pub(crate) fn status(dir: &Path, all: bool, output: Output) -> anyhow::Result<ExitCode> {
    let pki = Site::open(dir)?;
    let t = now();
    let mut lines = pki.status(t)?;
    if !all {
        // A machine renews every 20 days: its older certificates are history, not what it holds.
        let newest: std::collections::HashSet<(herd_pki::Authority, String)> =
            herd_pki::newest_per_holder(&lines).into_iter().map(|l| (l.authority, l.cert.serial.clone())).collect();
        lines.retain(|l| l.cert.is_ca || newest.contains(&(l.authority, l.cert.serial.clone())));
    }
    let json = json_lines(&lines, t);
    if output.json(&json)? {
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = json
        .iter()
        .map(|l| {
            vec![
                l.authority.to_string(),
                l.cert.common_name.clone(),
                l.rotation.map_or_else(|| role(l.cert), |r| format!("ca ({r})")),
                date(l.cert.not_after),
                l.days_left.to_string(),
                l.standing.as_str().to_owned(),
                l.cert.serial.chars().take(16).collect(),
            ]
        })
        .collect();
    print!("{}", table::render(&["CA", "SUBJECT", "ROLE", "NOT AFTER", "DAYS", "STANDING", "SERIAL"], &rows));
    Ok(ExitCode::SUCCESS)
}

/// `herdctl pki rotate`: begins the etcd CA's rotation (`begin`) and, with `follow`, polls where it stands until
/// every registered machine is on the new CA alone, for at most `limit`.
pub(crate) fn rotate(
    client: &herd_api::Client,
    begin: bool,
    follow: bool,
    limit: std::time::Duration,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut status = if begin {
        client.rotate().map_err(crate::machine_cmd::advice)?
    } else {
        client.rotation().map_err(crate::machine_cmd::advice)?
    };
    if follow {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        let started = std::time::Instant::now();
        while status.rotation != "steady" || status.waiting.is_some() {
            let waiting = status.waiting.as_deref().unwrap_or("the provisioner's next round");
            bar.set_message(format!("{}: waiting for {waiting}", status.rotation));
            if started.elapsed() > limit {
                bar.finish_and_clear();
                anyhow::bail!(
                    "the rotation is still {} after {} minutes, waiting for {waiting}; it goes on in the provisioner \
                     (`herdctl pki rotate --status`): look at those machines' node-init logs",
                    status.rotation,
                    limit.as_secs() / 60
                );
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
            status = client.rotation().map_err(crate::machine_cmd::advice)?;
        }
        bar.finish_and_clear();
    }
    if output.json(&status)? {
        return Ok(ExitCode::SUCCESS);
    }
    println!("etcd CA: {}; issuing: {}; trusted: {}", status.rotation, status.issuing, status.trusted.join(", "));
    if let Some(waiting) = &status.waiting {
        println!("waiting for {waiting}");
    }
    let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let rows: Vec<Vec<String>> =
        status.machines.iter().map(|m| vec![m.name.clone(), yes(m.trusts), yes(m.renewed)]).collect();
    print!("{}", table::render(&["MACHINE", "TRUSTS THE SITE'S CAS", "CERTIFICATES FROM THE ISSUING CA"], &rows));
    if follow {
        println!(
            "done: operator credentials issued before the rotation are refused now; issue them again with `herdctl \
             pki issue operator NAME`"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The lines as `status` and `prune` print them in JSON, with the days left at `t` (negative: ended).
fn json_lines(lines: &[herd_pki::StatusLine], t: OffsetDateTime) -> Vec<Line<'_>> {
    let days_left = |not_after: i64| (not_after - t.unix_timestamp()).div_euclid(86_400);
    lines
        .iter()
        .map(|l| Line {
            authority: l.authority,
            standing: l.standing,
            cert: &l.cert,
            days_left: days_left(l.cert.not_after),
            rotation: l.rotation,
        })
        .collect()
}

/// `herdctl pki prune`.
pub(crate) fn prune(dir: &Path, ended_days: u32, dry_run: bool, output: Output) -> anyhow::Result<ExitCode> {
    let (pki, t) = (Site::open(dir)?, now());
    let gone = pki.prune(t, time::Duration::days(i64::from(ended_days)), dry_run)?;
    let json = json_lines(&gone, t);
    if output.json(&json)? {
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = gone
        .iter()
        .map(|l| {
            let serial = l.cert.serial.chars().take(16).collect();
            vec![l.authority.to_string(), l.cert.common_name.clone(), date(l.cert.not_after), serial]
        })
        .collect();
    if !rows.is_empty() {
        print!("{}", table::render(&["CA", "SUBJECT", "NOT AFTER", "SERIAL"], &rows));
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {} certificate copies (ended {ended_days}+ days ago, each replaced by a newer one) from {}",
        gone.len(),
        dir.join("issued").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// What a certificate is for, in a word: `ca`, a machine's or member's kind, an operator's role.
fn role(cert: &herd_pki::CertInfo) -> String {
    match &cert.holder {
        Some(Holder::Operator(_, role)) => role.to_string(),
        Some(Holder::Machine(_)) => "machine".to_owned(),
        Some(Holder::Member(_)) => "member".to_owned(),
        Some(Holder::Server(_)) => "server".to_owned(),
        None if cert.is_ca => "ca".to_owned(),
        None => "-".to_owned(),
    }
}

fn date(unix: i64) -> String {
    let Ok(t) = OffsetDateTime::from_unix_timestamp(unix) else { return unix.to_string() };
    format!("{:04}-{:02}-{:02} {:02}:{:02}Z", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute())
}

/// The policy: every inventory machine (etcd members run the engine) and every operator of the site PKI.
pub(crate) fn policy(inventory: &Path, pki_dir: &Path) -> anyhow::Result<Policy> {
    let inv = herd_inventory::load(inventory).map_err(|e| anyhow::anyhow!("{e}"))?;
    let members: Vec<&str> = inv.etcd_members().map(|m| m.name.get_ref().as_str()).collect();
    let machines = inv.machines.iter().map(|m| m.name.get_ref().as_str()).map(|n| (n, members.contains(&n)));
    Ok(Policy::of_machines(machines, &Site::open(pki_dir)?, now())?)
}

/// `herdctl access apply`.
pub(crate) fn apply(args: &ClusterArgs, inventory: &Path, pki_dir: &Path) -> anyhow::Result<ExitCode> {
    let policy = policy(inventory, pki_dir)?;
    let cluster = crate::unit_cmd::Cluster::connect(args)?;
    let applied = cluster
        .block_on(access::apply(cluster.store(), &policy))
        .context("cannot apply etcd's users and roles (this needs an admin credential: --credentials DIR)")?;
    let admins = policy.operators.iter().filter(|(_, r)| *r == Role::Admin).count();
    println!(
        "etcd access: {} machines ({} run the engine), {} operators ({admins} admins); authentication on",
        policy.machines.len(),
        policy.machines.iter().filter(|(_, e)| *e).count(),
        policy.operators.len()
    );
    if applied.is_empty() {
        println!("nothing changed");
    }
    for (what, names) in [("roles set", &applied.roles), ("users set", &applied.users), ("removed", &applied.removed)] {
        if !names.is_empty() {
            println!("{what}: {}", names.join(" "));
        }
    }
    Ok(ExitCode::SUCCESS)
}
