// mmts's receivers connect to their peers with libpq, the PostgreSQL client library: the one
// of the server it is built for, found through that server's library directory at run time
// too. PostgreSQL loads mmts with RTLD_GLOBAL, so the libpq mmts loads is the one whose
// symbols the server's own libpqwalreceiver then binds to: an older libpq there would reject
// a newer server's connection options (`sslnegotiation` in 17+). One small C file
// (src/c/keep_errors.c) is compiled against the server's headers.
use std::process::Command;

fn pg_config(pg_config: &str, what: &str) -> String {
    let out = Command::new(pg_config).arg(what).output().unwrap_or_else(|e| panic!("cannot run {pg_config}: {e}"));
    assert!(out.status.success(), "{pg_config} {what} failed");
    String::from_utf8(out.stdout).expect("utf-8 path").trim().to_string()
}

/// The pg_config of the server being built for: `$PGRX_PG_CONFIG_PATH`, else the one pgrx is
/// configured with for the `pgNN` feature (`cargo pgrx init`, `$PGRX_HOME/config.toml`), else
/// pg_config on PATH.
fn server_pg_config() -> String {
    if let Ok(path) = std::env::var("PGRX_PG_CONFIG_PATH") {
        return path;
    }
    let feature = (13..=18)
        .map(|n| format!("pg{n}"))
        .find(|f| std::env::var_os(format!("CARGO_FEATURE_{}", f.to_uppercase())).is_some());
    let home =
        std::env::var("PGRX_HOME").unwrap_or_else(|_| format!("{}/.pgrx", std::env::var("HOME").unwrap_or_default()));
    let config = std::fs::read_to_string(format!("{home}/config.toml")).unwrap_or_default();
    println!("cargo:rerun-if-changed={home}/config.toml");
    feature
        .and_then(|f| {
            config.lines().find_map(|l| {
                let (key, value) = l.split_once('=')?;
                (key.trim() == f).then(|| value.trim().trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "pg_config".into())
}

fn main() {
    println!("cargo:rerun-if-changed=src/c/keep_errors.c");
    println!("cargo:rerun-if-env-changed=PGRX_PG_CONFIG_PATH");
    println!("cargo:rerun-if-env-changed=PGRX_HOME");
    let config = server_pg_config();
    let libdir = pg_config(&config, "--libdir");
    println!("cargo:rustc-link-search=native={libdir}");
    println!("cargo:rustc-link-lib=pq");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,{libdir}");
    let include = pg_config(&config, "--includedir-server");
    cc::Build::new().file("src/c/keep_errors.c").include(include).warnings(false).compile("mmts_c");
}
