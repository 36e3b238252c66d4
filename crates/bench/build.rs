//! Records the compiler that built the benchmark: every report prints it next to its figures.

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|version| version.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=CXGW_RUSTC_VERSION={rustc_version}");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
