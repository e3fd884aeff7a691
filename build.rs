// mmts's receivers connect to their peers with libpq, the PostgreSQL client library.
fn main() {
    println!("cargo:rustc-link-lib=pq");
}
