use std::os::unix::fs::PermissionsExt;

use super::*;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn site() -> (tempfile::TempDir, Site) {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::init(dir.path(), "lab", now()).unwrap();
    (dir, site)
}

fn operator(name: &str, role: Role) -> Subject {
    Subject::new(Holder::Operator(name.to_owned(), role), Duration::days(30))
}

#[test]
fn init_makes_two_cas_with_private_keys_and_never_runs_twice() {
    let (dir, site) = site();
    for a in Authority::ALL {
        let mode = std::fs::metadata(dir.path().join(key_file(a))).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{a}");
        assert!(site.ca_info(a).is_ca);
        assert_eq!(site.ca_info(a).standing(now()), Standing::Valid);
    }
    assert_ne!(site.ca_info(Authority::Etcd).fingerprint, site.ca_info(Authority::Api).fingerprint);
    let before = std::fs::read(dir.path().join("etcd-ca.key")).unwrap();
    let again = Site::init(dir.path(), "lab", now()).unwrap_err();
    assert!(matches!(again, PkiError::Exists { .. }), "{again}");
    assert_eq!(std::fs::read(dir.path().join("etcd-ca.key")).unwrap(), before, "a second init changed the CA key");
}

#[test]
fn a_certificate_verifies_against_its_own_ca_only() {
    let (_dir, site) = site();
    let issued = site.issue(Authority::Etcd, &operator("alice", Role::ReadOnly), KeySource::Generate, now()).unwrap();
    assert!(issued.key_pem.is_some());
    let info = site.verify(Authority::Etcd, &issued.cert_pem, now()).unwrap();
    assert_eq!(info.common_name, "operator:alice");
    assert_eq!(info.organization, "herd:read-only");
    assert_eq!(info.holder, Some(Holder::Operator("alice".to_owned(), Role::ReadOnly)));
    assert_eq!(site.verify(Authority::Api, &issued.cert_pem, now()), Err(VerifyError::Foreign(Authority::Api)));
    let (_other_dir, other) = self::site();
    assert_eq!(other.verify(Authority::Etcd, &issued.cert_pem, now()), Err(VerifyError::Foreign(Authority::Etcd)));
}

#[test]
fn a_request_lends_only_its_key_the_names_come_from_the_issuer() {
    let (_dir, site) = site();
    let (key_pem, csr) = request("root").unwrap();
    let mut subject = Subject::new(Holder::Machine("r01-m02".to_owned()), Duration::days(7));
    subject.dns = vec!["r01-m02".to_owned(), "r01-m02.dc1.example".to_owned()];
    subject.ips = vec!["10.0.0.12".parse().unwrap()];
    let issued = site.issue(Authority::Etcd, &subject, KeySource::Request(&csr), now()).unwrap();
    assert!(issued.key_pem.is_none(), "a request's key stays with its maker");
    assert_eq!(issued.info.common_name, "machine:r01-m02", "the request's own subject (root) was used");
    // The certificate holds the request's public key.
    let key = KeyPair::from_pem(&key_pem).unwrap();
    assert_eq!(public_key(&issued.cert_pem).as_deref(), Some(key.public_key_raw()));
    // A request whose signature does not match its content is refused, and nothing is recorded for it.
    let before = site.status(now()).unwrap().len();
    let tampered = tamper(&csr);
    let err = site.issue(Authority::Etcd, &subject, KeySource::Request(&tampered), now()).unwrap_err();
    assert!(matches!(err, PkiError::Request { .. }), "{err}");
    assert_eq!(site.status(now()).unwrap().len(), before);
}

/// Flips a bit in the middle of a PEM block's body.
fn tamper(pem: &str) -> String {
    let mut lines: Vec<String> = pem.lines().map(str::to_owned).collect();
    let mid = lines.len() / 2;
    let mut bytes = lines[mid].clone().into_bytes();
    bytes[10] = if bytes[10] == b'A' { b'B' } else { b'A' };
    lines[mid] = String::from_utf8(bytes).unwrap();
    lines.join("\n") + "\n"
}

#[test]
fn validity_is_bounded_by_time_and_by_the_ca() {
    let (_dir, site) = site();
    let issued = site.issue(Authority::Api, &operator("bob", Role::Operator), KeySource::Generate, now()).unwrap();
    let later = now() + Duration::days(31);
    assert_eq!(site.verify(Authority::Api, &issued.cert_pem, later), Err(VerifyError::Standing(Standing::Expired)));
    assert_eq!(issued.info.standing(now() + Duration::days(25)), Standing::RenewSoon);
    let earlier = now() - Duration::hours(1);
    assert_eq!(
        site.verify(Authority::Api, &issued.cert_pem, earlier),
        Err(VerifyError::Standing(Standing::NotYetValid))
    );
    // An expired CA issues nothing.
    let err = site
        .issue(Authority::Api, &operator("bob", Role::Operator), KeySource::Generate, now() + CA_VALIDITY)
        .unwrap_err();
    assert!(matches!(err, PkiError::CaUnusable { standing: Standing::Expired, .. }), "{err}");
}

#[test]
fn a_key_others_can_read_is_refused_with_the_fix() {
    let (dir, _site) = site();
    let key = dir.path().join("api-ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = Site::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    Site::open(dir.path()).unwrap();
}

#[test]
fn a_ca_key_swapped_for_another_is_found() {
    let (dir, _site) = site();
    std::fs::copy(dir.path().join("etcd-ca.key"), dir.path().join("api-ca.key")).unwrap();
    let err = Site::open(dir.path()).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
}

#[test]
fn names_unfit_for_a_certificate_are_refused_before_anything_is_issued() {
    let (_dir, site) = site();
    let mut bad = vec![
        operator("Alice", Role::Admin),
        operator("a b", Role::Admin),
        operator("", Role::Admin),
        operator(&"x".repeat(64), Role::Admin),
        Subject::new(Holder::Machine("-m1".to_owned()), Duration::days(1)),
        Subject::new(Holder::Machine("m1".to_owned()), Duration::ZERO),
    ];
    let mut dns = Subject::new(Holder::Member("m1".to_owned()), Duration::days(1));
    dns.dns = vec!["m1.exa mple".to_owned()];
    bad.push(dns);
    // The peer tag is the members' alone: a machine named so would pass etcd's peer check.
    let mut peer = Subject::new(Holder::Machine("m1".to_owned()), Duration::days(1));
    peer.dns = vec![PEER_NAME.to_owned()];
    bad.push(peer);
    for subject in &bad {
        let err = site.issue(Authority::Etcd, subject, KeySource::Generate, now()).unwrap_err();
        assert!(matches!(err, PkiError::Subject { .. }), "{subject:?}: {err}");
    }
    assert_eq!(site.status(now()).unwrap().len(), 2, "only the two CAs");
    assert!(Site::init(&site.dir().join("x"), "Bad Site", now()).is_err());
}

#[test]
fn status_lists_the_cas_then_every_leaf_by_expiry() {
    let (dir, site) = site();
    let mut long = operator("carol", Role::Admin);
    long.validity = Duration::days(90);
    site.issue(Authority::Etcd, &long, KeySource::Generate, now()).unwrap();
    site.issue(Authority::Api, &operator("dave", Role::Operator), KeySource::Generate, now()).unwrap();
    let lines = Site::open(dir.path()).unwrap().status(now() + Duration::days(70)).unwrap();
    let names: Vec<(&str, Standing)> = lines.iter().map(|l| (l.cert.common_name.as_str(), l.standing)).collect();
    assert_eq!(
        names,
        [
            ("herd lab etcd CA", Standing::Valid),
            ("herd lab api CA", Standing::Valid),
            ("operator:dave", Standing::Expired),
            ("operator:carol", Standing::RenewSoon),
        ]
    );
}

#[test]
fn subjects_round_trip_and_foreign_ones_are_not_ours() {
    for h in [
        Holder::Machine("m1".to_owned()),
        Holder::Member("m1".to_owned()),
        Holder::Server("provisioner".to_owned()),
        Holder::Operator("alice".to_owned(), Role::Admin),
        Holder::Operator("alice".to_owned(), Role::ReadOnly),
    ] {
        assert_eq!(Holder::from_subject(&h.common_name(), &h.organization()), Some(h.clone()), "{h}");
    }
    for (cn, o) in [
        ("root", "herd:admin"),
        ("operator:alice", "herd:machine"),
        ("machine:m1", "herd:admin"),
        ("machine:M1", "herd:machine"),
        ("operator:alice", "herd:root"),
    ] {
        assert_eq!(Holder::from_subject(cn, o), None, "{cn} {o}");
    }
}

#[test]
fn a_requests_fingerprint_is_its_keys_and_nothing_else() {
    let key = new_key().unwrap();
    let (one, other) = (request_for(&key, "machine:a").unwrap(), request_for(&key, "machine:b").unwrap());
    // The same key under another name: the same fingerprint (names come from the issuer, never the request).
    assert_eq!(requests_fingerprint(&[&one]), requests_fingerprint(&[&other]));
    let (_, fresh) = request("machine:a").unwrap();
    assert_ne!(requests_fingerprint(&[&one]).unwrap(), requests_fingerprint(&[&fresh]).unwrap());
    // Two requests: both keys count, in order.
    let both = requests_fingerprint(&[&one, &fresh]).unwrap();
    assert_ne!(both, requests_fingerprint(&[&fresh, &one]).unwrap());
    assert_eq!(both.len(), 32 * 3 - 1, "{both}");
    assert!(
        requests_fingerprint(&["-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"])
            .is_err()
    );
}

#[test]
fn only_every_holders_newest_certificate_counts() {
    let (_dir, site) = site();
    let at = now();
    let m1 = |days| Subject::new(Holder::Machine("m1".to_owned()), Duration::days(days));
    for subject in [m1(7), m1(30), Subject::new(Holder::Machine("m2".to_owned()), Duration::days(3))] {
        site.issue(Authority::Etcd, &subject, KeySource::Generate, at).unwrap();
    }
    let lines = site.status(at).unwrap();
    let newest = newest_per_holder(&lines);
    let seen: Vec<(&str, i64)> = newest
        .iter()
        .map(|l| (l.cert.common_name.as_str(), (l.cert.not_after - at.unix_timestamp() + 43_200) / 86_400))
        .collect();
    assert_eq!(seen, [("machine:m1", 30), ("machine:m2", 3)], "the CAs and m1's 7-day certificate left out");
}

#[test]
fn only_a_request_signed_by_a_certificates_own_key_proves_possession_of_it() {
    let (_dir, site) = site();
    let key = new_key().unwrap();
    let csr = request_for(&key, "machine:m1").unwrap();
    let subject = Subject::new(Holder::Machine("m1".into()), Duration::days(1));
    let cert = site.issue(Authority::Etcd, &subject, KeySource::Request(&csr), now()).unwrap().cert_pem;
    // The same key asks again (a renewal): proven, with a fresh request too.
    assert_eq!(request_proves(&csr, &cert), Ok(()));
    assert_eq!(request_proves(&request_for(&key, "machine:m1").unwrap(), &cert), Ok(()));
    // Another key, whatever its request says, proves nothing.
    let (_, other) = request("machine:m1").unwrap();
    assert_eq!(request_proves(&other, &cert).unwrap_err(), "the request is not signed by the certificate's key");
    assert!(request_proves(&csr, "not a certificate").is_err());
    assert!(request_proves(&cert, &cert).unwrap_err().contains("not a valid signed request"));
}

#[test]
fn only_the_certificates_own_key_signs_a_message_it_accepts_and_only_that_message() {
    let (_dir, site) = site();
    let key = new_key().unwrap();
    let csr = request_for(&key, "machine:m1").unwrap();
    let subject = Subject::new(Holder::Machine("m1".into()), Duration::days(1));
    let cert = site.issue(Authority::Etcd, &subject, KeySource::Request(&csr), now()).unwrap().cert_pem;
    let signature = sign(&key, b"report 1").unwrap();
    assert_eq!(signed_by(&cert, b"report 1", &signature), Ok(()));
    // Another message, a flipped bit, another key: refused.
    let refused = "the signature is not of this message by the certificate's key";
    assert_eq!(signed_by(&cert, b"report 2", &signature).unwrap_err(), refused);
    let mut flipped = signature.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert_eq!(signed_by(&cert, b"report 1", &flipped).unwrap_err(), refused);
    let other = sign(&new_key().unwrap(), b"report 1").unwrap();
    assert_eq!(signed_by(&cert, b"report 1", &other).unwrap_err(), refused);
    assert!(signed_by("not a certificate", b"report 1", &signature).unwrap_err().starts_with("not a PEM certificate"));
    assert!(sign("not a key", b"x").unwrap_err().to_string().contains("not a private key"));
}

#[test]
fn prune_removes_only_long_ended_certificates_a_newer_one_replaced() {
    let (dir, site) = site();
    let at = now();
    let m = |name: &str, days: i64| Subject::new(Holder::Machine(name.to_owned()), Duration::days(days));
    let mut serial = std::collections::HashMap::new();
    for (key, subject) in [("m1-7", m("m1", 7)), ("m1-35", m("m1", 35)), ("m1-90", m("m1", 90)), ("m2-7", m("m2", 7))] {
        serial.insert(key, site.issue(Authority::Etcd, &subject, KeySource::Generate, at).unwrap().info.serial);
    }
    // 60 days on: m1's 7-day certificate ended 53 days ago and its 35-day one 25 days ago; m2's ended 53 days ago
    // but is m2's newest.
    let later = at + Duration::days(60);
    let serials = |lines: &[StatusLine]| lines.iter().map(|l| l.cert.serial.clone()).collect::<Vec<_>>();
    let would = site.prune(later, Duration::days(30), true).unwrap();
    assert_eq!(serials(&would), [serial["m1-7"].clone()]);
    let file = dir.path().join("issued/etcd").join(format!("{}.crt", serial["m1-7"]));
    assert!(file.exists(), "a dry run removes nothing");
    let removed = site.prune(later, Duration::days(30), false).unwrap();
    assert_eq!(serials(&removed), serials(&would));
    assert!(!file.exists());
    let left = serials(&site.status(later).unwrap());
    for key in ["m1-35", "m1-90", "m2-7"] {
        assert!(left.contains(&serial[key]), "{key} kept");
    }
    assert!(site.prune(later, Duration::days(30), false).unwrap().is_empty(), "nothing more to prune");
}

fn machine(name: &str) -> Subject {
    Subject::new(Holder::Machine(name.to_owned()), Duration::days(30))
}

fn issue(site: &Site, subject: &Subject) -> String {
    site.issue(Authority::Etcd, subject, KeySource::Generate, now()).unwrap().cert_pem
}

#[test]
fn a_rotation_trusts_the_next_ca_then_issues_from_it_then_drops_the_old_one() {
    let (dir, mut site) = site();
    let (first, api) = (site.ca_pem(Authority::Etcd).to_owned(), site.ca_pem(Authority::Api).to_owned());
    let old_leaf = issue(&site, &machine("m1"));
    assert_eq!(site.rotation(Authority::Etcd), Rotation::Steady);
    assert_eq!(split_pems(&site.trust_pem(Authority::Etcd)), std::slice::from_ref(&first));

    // Accepting: the next CA is trusted, the first one still issues.
    let next = site.begin_rotation(Authority::Etcd, now()).unwrap();
    assert_eq!(next.common_name, "herd lab etcd CA 2");
    assert_eq!(site.rotation(Authority::Etcd), Rotation::Accepting);
    let trust = split_pems(&site.trust_pem(Authority::Etcd));
    assert_eq!(trust.len(), 2);
    assert_eq!(trust[0], first, "the CA that issues comes first");
    let accepting_leaf = issue(&site, &machine("m2"));
    assert!(verify(&first, Authority::Etcd, &accepting_leaf, now()).is_ok(), "issued by the first CA still");
    let again = site.begin_rotation(Authority::Etcd, now()).unwrap_err();
    assert!(matches!(again, PkiError::Rotation { .. }), "{again}");
    assert_eq!(Site::open(dir.path()).unwrap().rotation(Authority::Etcd), Rotation::Accepting, "not durable");
    let roles: Vec<_> = site.status(now()).unwrap().into_iter().filter_map(|l| l.rotation).collect();
    assert_eq!(roles, ["next"]);

    // Switched: the new CA issues; what the first one issued still verifies.
    let issuing = site.switch_rotation(Authority::Etcd).unwrap();
    assert_eq!(issuing.fingerprint, next.fingerprint);
    assert_eq!(site.rotation(Authority::Etcd), Rotation::Switched);
    let new_leaf = issue(&site, &machine("m1"));
    assert!(verify(&first, Authority::Etcd, &new_leaf, now()).is_err(), "still issued by the first CA");
    assert!(verify(site.ca_pem(Authority::Etcd), Authority::Etcd, &new_leaf, now()).is_ok());
    for leaf in [&old_leaf, &accepting_leaf, &new_leaf] {
        site.verify(Authority::Etcd, leaf, now()).unwrap();
    }
    assert_eq!(split_pems(&site.trust_pem(Authority::Etcd))[1], first, "the previous CA is trusted last");
    assert!(!dir.path().join("etcd-ca.next.key").exists(), "the next key stays behind");
    let reopened = Site::open(dir.path()).unwrap();
    assert_eq!(
        (reopened.rotation(Authority::Etcd), reopened.ca_info(Authority::Etcd).common_name.as_str()),
        (Rotation::Switched, "herd lab etcd CA 2")
    );

    // Steady again: the first CA is trusted no more, and kept in retired/.
    let dropped = site.end_rotation(Authority::Etcd).unwrap();
    assert_eq!(dropped.common_name, "herd lab etcd CA");
    assert_eq!(site.rotation(Authority::Etcd), Rotation::Steady);
    assert_eq!(split_pems(&site.trust_pem(Authority::Etcd)).len(), 1);
    assert!(matches!(site.verify(Authority::Etcd, &old_leaf, now()), Err(VerifyError::Foreign(_))));
    site.verify(Authority::Etcd, &new_leaf, now()).unwrap();
    assert!(dir.path().join(format!("retired/etcd-ca-{}.crt", dropped.serial)).exists());
    for step in [site.switch_rotation(Authority::Etcd), site.end_rotation(Authority::Etcd)] {
        assert!(matches!(step, Err(PkiError::Rotation { .. })), "a step out of order was taken");
    }
    // The other authority never moved; a second rotation counts on.
    assert_eq!(site.ca_pem(Authority::Api), api);
    assert_eq!(site.begin_rotation(Authority::Etcd, now()).unwrap().common_name, "herd lab etcd CA 3");
}

#[test]
fn a_rotation_step_cut_by_a_power_cut_is_finished_or_begun_again_when_the_site_opens() {
    // A switch cut between moving the next key into place and moving its certificate: finished by open.
    let (dir, mut site) = site();
    let next = site.begin_rotation(Authority::Etcd, now()).unwrap();
    let d = dir.path();
    std::fs::copy(d.join("etcd-ca.crt"), d.join("etcd-ca.previous.crt")).unwrap();
    std::fs::rename(d.join("etcd-ca.next.key"), d.join("etcd-ca.key")).unwrap();
    let site = Site::open(d).unwrap();
    assert_eq!(site.rotation(Authority::Etcd), Rotation::Switched);
    assert_eq!(site.ca_info(Authority::Etcd).fingerprint, next.fingerprint);
    site.verify(Authority::Etcd, &issue(&site, &machine("m1")), now()).unwrap();

    // A switch cut after writing the previous copy only: still accepting, and the switch goes through.
    let (dir, mut site) = self::site();
    site.begin_rotation(Authority::Etcd, now()).unwrap();
    let d = dir.path();
    std::fs::copy(d.join("etcd-ca.crt"), d.join("etcd-ca.previous.crt")).unwrap();
    let mut site = Site::open(d).unwrap();
    assert_eq!(site.rotation(Authority::Etcd), Rotation::Accepting);
    site.switch_rotation(Authority::Etcd).unwrap();
    assert_eq!(site.rotation(Authority::Etcd), Rotation::Switched);

    // A beginning cut after the key: nothing under way, and it begins again.
    let (dir, mut site) = self::site();
    site.begin_rotation(Authority::Etcd, now()).unwrap();
    std::fs::remove_file(dir.path().join("etcd-ca.next.crt")).unwrap();
    let mut site = Site::open(dir.path()).unwrap();
    assert_eq!(site.rotation(Authority::Etcd), Rotation::Steady);
    site.begin_rotation(Authority::Etcd, now()).unwrap();
    // A next certificate without its key is refused with what to do.
    std::fs::remove_file(dir.path().join("etcd-ca.next.key")).unwrap();
    let err = Site::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("without its key"), "{err}");
}

#[test]
fn a_bundle_verifies_what_any_of_its_cas_issued_and_nothing_else() {
    let ((_a, one), (_b, two), (_c, other)) = (site(), site(), site());
    let bundle = format!("{}{}", one.ca_pem(Authority::Etcd), two.ca_pem(Authority::Etcd));
    assert_eq!(split_pems(&bundle).len(), 2);
    assert_eq!(split_pems("garbage -----BEGIN CERTIFICATE----- no end"), Vec::<String>::new());
    for site in [&one, &two] {
        verify_any(&bundle, Authority::Etcd, &issue(site, &machine("m1")), now()).unwrap();
    }
    let foreign = verify_any(&bundle, Authority::Etcd, &issue(&other, &machine("m1")), now());
    assert!(matches!(foreign, Err(VerifyError::Foreign(Authority::Etcd))), "{foreign:?}");
    assert!(matches!(
        verify_any("", Authority::Etcd, &issue(&one, &machine("m1")), now()),
        Err(VerifyError::Foreign(_))
    ));
}
