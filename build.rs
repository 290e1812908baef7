//! Compiles the thin C layer (src/interp/glue.c) against the system Perl and
//! links libperl.  Flags come from ExtUtils::Embed so they always match the
//! perl that will run the applications.

use std::process::Command;

fn perl_embed(what: &str) -> String {
    let out = Command::new("perl")
        .args(["-MExtUtils::Embed", "-e", what])
        .output()
        .unwrap_or_else(|e| panic!("running `perl -MExtUtils::Embed -e {what}` failed: {e}"));
    assert!(
        out.status.success(),
        "`perl -MExtUtils::Embed -e {what}` failed; is libperl-dev installed? ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("ExtUtils::Embed printed non-UTF-8")
}

fn main() {
    println!("cargo:rerun-if-changed=src/interp/glue.c");
    println!("cargo:rerun-if-changed=build.rs");

    let mut build = cc::Build::new();
    build.file("src/interp/glue.c");
    for flag in perl_embed("ccopts").split_whitespace() {
        if let Some(dir) = flag.strip_prefix("-I") {
            build.include(dir);
        } else if let Some(def) = flag.strip_prefix("-D") {
            match def.split_once('=') {
                Some((k, v)) => build.define(k, v),
                None => build.define(def, None),
            };
        } else {
            // -fwrapv and -fno-strict-aliasing: Perl's headers assume them.
            build.flag_if_supported(flag);
        }
    }
    build.warnings(false);
    build.compile("pagi_glue");

    let mut linked_perl = false;
    for flag in perl_embed("ldopts").split_whitespace() {
        if let Some(dir) = flag.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={dir}");
        } else if let Some(lib) = flag.strip_prefix("-l") {
            println!("cargo:rustc-link-lib={lib}");
            linked_perl |= lib == "perl";
        }
    }
    assert!(linked_perl, "ExtUtils::Embed ldopts did not mention -lperl");
    // Debian ships libperl.so in the multiarch directory, not in CORE/.
    let multiarch = Command::new("perl")
        .args(["-MConfig", "-e", "print $Config{archlibexp}"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    if let Some(lib_dir) = multiarch.split("/perl/").next() {
        if !lib_dir.is_empty() {
            println!("cargo:rustc-link-search=native={lib_dir}");
        }
    }
}
