// mmts's receivers connect to their peers with libpq, the PostgreSQL client library; one
// small C file (src/c/keep_errors.c) is compiled against the server's headers.
use std::process::Command;

fn main() {
    println!("cargo:rustc-link-lib=pq");
    println!("cargo:rerun-if-changed=src/c/keep_errors.c");
    println!("cargo:rerun-if-env-changed=PGRX_PG_CONFIG_PATH");
    // cargo-pgrx names the server being built for; a plain `cargo build` takes pg_config on PATH.
    let pg_config = std::env::var("PGRX_PG_CONFIG_PATH").unwrap_or_else(|_| "pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--includedir-server")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {pg_config}: {e}"));
    assert!(out.status.success(), "{pg_config} --includedir-server failed");
    let include = String::from_utf8(out.stdout).expect("utf-8 path");
    cc::Build::new().file("src/c/keep_errors.c").include(include.trim()).warnings(false).compile("mmts_c");
}
