// `sqlx::migrate!` embeds the migrations at compile time; rebuild when one
// is added or changed, not only when Rust sources change. The git revision,
// when there is one, labels `sendgate_build_info`.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-env-changed=SENDGATE_REVISION");
    let revision = std::env::var("SENDGATE_REVISION")
        .ok()
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SENDGATE_REVISION={revision}");
}
