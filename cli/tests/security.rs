//! TLS and authentication of a cluster of real processes on loopback: a JobManager with TLS,
//! bearer tokens and the HTTP API, TaskManagers with mutual TLS, clients with and without the
//! right CA and token, a TaskManager of another CA, and certificates replaced while running.
mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

fn certs(dir: &Path) {
    let o = freshet()
        .args(["certs", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["ca.crt", "tls.crt", "tls.key", "token"] {
        assert!(dir.join(f).is_file(), "freshet certs wrote no {f}");
    }
}

/// `freshet list` against `address` with `extra` client arguments.
fn list(address: &str, extra: &[String]) -> Output {
    freshet()
        .args(["list", "--jobmanager", address])
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `curl` of the HTTP API over TLS; returns (status code, body).
fn curl(url: &str, ca: &Path, token: Option<&str>) -> (String, String) {
    let mut c = std::process::Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(ca)
    .arg(url);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let o = c.output().expect("curl");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

/// Replaces the files in `dst` with those of `src`, each by a rename (as a Secret volume does).
fn replace_files(src: &Path, dst: &Path) {
    for f in ["ca.crt", "tls.crt", "tls.key", "token"] {
        let tmp = dst.join(format!(".{f}.new"));
        std::fs::copy(src.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, dst.join(f)).unwrap();
    }
}

#[test]
fn a_cluster_with_tls_and_tokens_runs_jobs_and_refuses_strangers() {
    let work = tempfile::tempdir().unwrap();
    let tls = work.path().join("tls");
    let rogue = work.path().join("rogue");
    certs(&tls);
    certs(&rogue);
    let token = std::fs::read_to_string(tls.join("token"))
        .unwrap()
        .trim()
        .to_string();
    let address = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let mut a: Vec<String> = vec![
        "jobmanager".into(),
        "--listen".into(),
        address.clone(),
        "--http".into(),
        http.clone(),
        "--ha-dir".into(),
        work.path().join("ha").display().to_string(),
        "--auth-token-file".into(),
        tls.join("token").display().to_string(),
    ];
    a.extend(tls_args(&tls));
    let jm = Proc::start(&a);
    jm.wait_for("JobManager listening on");
    let state = work.path().join("state");
    let tm_args = tls_args(&tls);
    let tm_args: Vec<&str> = tm_args.iter().map(String::as_str).collect();
    let tms: Vec<Proc> = (0..2)
        .map(|i| taskmanager_with(&address, &format!("tm-{i}"), &state, 2, &tm_args))
        .collect();
    for tm in &tms {
        tm.wait_for("registered with the JobManager");
    }
    // a TaskManager whose certificate another CA signed never gets in
    let rogue_args = tls_args(&rogue);
    let rogue_args: Vec<&str> = rogue_args.iter().map(String::as_str).collect();
    let intruder = taskmanager_with(&address, "intruder", &state, 8, &rogue_args);
    intruder.wait_for("cannot register with the JobManager");
    jm.wait_for("TLS handshake failed");

    // the data plane speaks only TLS, to certificates of the cluster's CA
    let line = tms[0].wait_for("(data ");
    let data = line
        .rsplit("(data ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .to_string();
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&data).unwrap();
        let _ = s.write_all(&[0, 0, 0, 9, 1, 0, 0, 0, 0, 1, 2, 3, 4]);
    }
    tms[0].wait_for("refused a data connection");

    let client = |dir: &Path, token: &Path| -> Vec<String> {
        vec![
            "--tls-ca".into(),
            dir.join("ca.crt").display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
        ]
    };
    let ok_client = client(&tls, &tls.join("token"));

    // a job across both TaskManagers (3 slots of 2 + 2): its shuffle crosses the data plane
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let chk = work.path().join("checkpoints").display().to_string();
    let mut s = args("orders-paid", 3, &out, &chk, 1.0);
    s[0] = "submit".into();
    s.extend(["--jobmanager".into(), address.clone()]);
    s.extend(ok_client.iter().cloned());
    let id = run_submit(&s);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = list(&address, &ok_client);
        assert!(o.status.success(), "list with CA and token: {}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if text
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("finished"))
        {
            break;
        }
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("failed")),
            "{text}\n{}\n{}",
            jm.log(),
            tms[0].log()
        );
        assert!(
            Instant::now() < deadline,
            "job did not finish:\n{}",
            jm.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    check_output("orders-paid", &out, "over mutual TLS");
    assert!(
        jm.log().contains("deploying")
            && !intruder.log().contains("registered with the JobManager"),
        "the intruder registered:\n{}",
        intruder.log()
    );

    // clients without TLS, without a token, with a wrong token or trusting another CA are refused
    let plain = list(&address, &[]);
    assert!(!plain.status.success(), "a plaintext client was served");
    let wrong = work.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let no_token = list(
        &address,
        &["--tls-ca".into(), tls.join("ca.crt").display().to_string()],
    );
    assert!(
        stderr(&no_token).contains("bearer token is required"),
        "{}",
        stderr(&no_token)
    );
    let bad_token = list(&address, &client(&tls, &wrong));
    assert!(
        stderr(&bad_token).contains("not valid"),
        "{}",
        stderr(&bad_token)
    );
    let other_ca = list(&address, &client(&rogue, &tls.join("token")));
    assert!(
        !other_ca.status.success(),
        "a client trusting another CA connected"
    );
    // a client with the cluster's certificate needs no token
    let by_cert = list(&address, &tls_args(&tls));
    assert!(by_cert.status.success(), "{}", stderr(&by_cert));

    // the HTTP API is served over TLS and wants the token
    let url = format!("https://{http}/jobs");
    let (code, body) = curl(&url, &tls.join("ca.crt"), Some(&token));
    assert_eq!(code, "200", "{body}");
    assert!(body.contains(&id), "{body}");
    let (code, body) = curl(&url, &tls.join("ca.crt"), None);
    assert_eq!(code, "401", "{body}");
    let (code, _) = curl(&url, &tls.join("ca.crt"), Some("not-the-token"));
    assert_eq!(code, "401");
    // the web UI's page, assets and the OpenAPI document hold no job data: no token needed;
    // everything the page reads does need it
    for path in ["/", "/ui/app.js", "/ui/style.css", "/openapi.json"] {
        let (code, body) = curl(&format!("https://{http}{path}"), &tls.join("ca.crt"), None);
        assert_eq!(code, "200", "{path}: {body}");
    }
    for path in [
        format!("/jobs/{id}"),
        "/taskmanagers".into(),
        format!("/jobs/{id}/exceptions"),
    ] {
        let (code, body) = curl(&format!("https://{http}{path}"), &tls.join("ca.crt"), None);
        assert_eq!(code, "401", "{path}: {body}");
    }

    // new certificates and a new token, swapped in under the running processes
    let next = work.path().join("next");
    certs(&next);
    let old_ca = work.path().join("old-ca.crt");
    std::fs::copy(tls.join("ca.crt"), &old_ca).unwrap();
    replace_files(&next, &tls);
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = list(&address, &ok_client);
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new CA and token are not accepted: {}\n{}",
            stderr(&o),
            jm.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    jm.wait_for("TLS certificates changed");
    jm.wait_for("token file changed");
    let stale = list(
        &address,
        &[
            "--tls-ca".into(),
            old_ca.display().to_string(),
            "--token-file".into(),
            wrong.display().to_string(),
        ],
    );
    assert!(
        !stale.status.success(),
        "the old CA still verifies the JobManager"
    );
    let old_token = work.path().join("old-token");
    std::fs::write(&old_token, format!("{token}\n")).unwrap();
    let o = list(&address, &client(&tls, &old_token));
    assert!(stderr(&o).contains("not valid"), "{}", stderr(&o));

    // no process wrote a token into its log
    let new_token = std::fs::read_to_string(tls.join("token"))
        .unwrap()
        .trim()
        .to_string();
    for p in tms.iter().chain([&jm, &intruder]) {
        let log = p.log();
        assert!(
            !log.contains(&token) && !log.contains(&new_token),
            "a token in a log:\n{log}"
        );
    }
}

#[test]
fn tls_settings_that_cannot_work_are_refused_at_start() {
    let work = tempfile::tempdir().unwrap();
    let tls = work.path().join("tls");
    certs(&tls);
    let run = |extra: &[String]| {
        let mut c = freshet();
        c.args(["jobmanager", "--listen", "127.0.0.1:0"])
            .args(extra);
        c.output().unwrap()
    };
    // half the files
    let o = run(&[
        "--tls-cert".into(),
        tls.join("tls.crt").display().to_string(),
    ]);
    assert!(
        stderr(&o).contains("--tls-cert, --tls-key and --tls-ca"),
        "{}",
        stderr(&o)
    );
    // a key that is not one
    let mut a = tls_args(&tls);
    a[3] = tls.join("ca.crt").display().to_string();
    let o = run(&a);
    assert!(stderr(&o).contains("TLS key"), "{}", stderr(&o));
    // an HTTP API under TLS with no token to tell callers apart
    let mut a = tls_args(&tls);
    a.extend(["--http".into(), "127.0.0.1:0".into()]);
    let o = run(&a);
    assert!(stderr(&o).contains("needs bearer tokens"), "{}", stderr(&o));
    // an empty token file
    let empty = work.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let o = run(&["--auth-token-file".into(), empty.display().to_string()]);
    assert!(stderr(&o).contains("no token in it"), "{}", stderr(&o));
}
