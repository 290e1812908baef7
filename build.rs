//! Compiles the thin C layer (src/interp/c/, one job per file) against the
//! system Perl and links libperl.  Flags come from ExtUtils::Embed so they
//! always match the perl that will run the applications.

use std::process::Command;

/// The C layer, listed rather than globbed so that a stray file is not
/// compiled in unnoticed; see glue.h for what each file shares.
const GLUE_HEADERS: &[&str] = &["src/interp/c/glue.h"];
const GLUE_SOURCES: &[&str] = &[
    "src/interp/c/lifecycle.c",
    "src/interp/c/calls.c",
    "src/interp/c/signals.c",
    "src/interp/c/lookups.c",
    "src/interp/c/convert.c",
    "src/interp/c/interned.c",
    "src/interp/c/request.c",
    "src/interp/c/spare_scope.c",
    "src/interp/c/response.c",
    "src/interp/c/exchange.c",
    "src/interp/c/send.c",
    "src/interp/c/bound_sub.c",
    "src/interp/c/http_app.c",
    "src/interp/c/fast_send.c",
    "src/interp/c/lend.c",
    "src/interp/c/pending.c",
    "src/interp/c/sse.c",
    "src/interp/c/websocket.c",
    "src/interp/c/services.c",
    "src/interp/c/opcount.c",
    "src/interp/c/method_cache.c",
];

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
    println!("cargo:rerun-if-changed=build.rs");
    for path in GLUE_HEADERS.iter().chain(GLUE_SOURCES) {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed={CONSTANTS}");
    println!("cargo:rerun-if-env-changed=PAGI_RS_SANITIZE");

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    generate_constants(&out_dir);

    let mut build = cc::Build::new();
    build.files(GLUE_SOURCES);
    build.include(&out_dir);
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
    // `PAGI_RS_SANITIZE=address` builds the C layer with AddressSanitizer
    // and links its runtime (`make asan-test`).  Only the C layer and the
    // allocations it makes through malloc are checked: libperl and Rust are
    // not instrumented, but ASan's malloc/free catch double frees and frees
    // of memory another interpreter owns.
    if std::env::var("PAGI_RS_SANITIZE").as_deref() == Ok("address") {
        build
            .flag("-fsanitize=address")
            .flag("-fno-omit-frame-pointer");
        // The linker may be rust-lld, which does not add the runtime for
        // -fsanitize; name the library.  It then does not come first in
        // the load order: run with ASAN_OPTIONS=verify_asan_link_order=0.
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    build.compile("pagi_glue");
    // The C layer's Perl_call_method (method_cache.c) must be the one that
    // libperl and the XS modules it loads bind to: the dynamic linker looks
    // in the executable first, but only at the symbols it exports.
    println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=Perl_call_method");

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

// ---- the numbers Rust, C and Perl share -------------------------------------

/// Their only source; see its header for the syntax.
const CONSTANTS: &str = "src/interp/constants.def";

struct Group {
    name: String,
    c_prefix: Option<String>,
    perl_prefix: String,
    entries: Vec<(String, i64)>,
}

fn parse_constants(text: &str) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{CONSTANTS}:{}", n + 1);
        let words: Vec<&str> = line.split_whitespace().collect();
        if words[0] == "group" {
            let (mut c_prefix, mut perl_prefix) = (None, None);
            for w in &words[2..] {
                match w.split_once('=') {
                    Some(("c", "-")) => c_prefix = Some(None),
                    Some(("c", p)) => c_prefix = Some(Some(p.to_string())),
                    Some(("perl", p)) => perl_prefix = Some(p.to_string()),
                    _ => panic!("{}: unknown group option {w:?}", at()),
                }
            }
            let name = words
                .get(1)
                .unwrap_or_else(|| panic!("{}: group needs a name", at()));
            groups.push(Group {
                name: name.to_string(),
                c_prefix: c_prefix.unwrap_or_else(|| panic!("{}: group needs c=", at())),
                perl_prefix: perl_prefix.unwrap_or_else(|| panic!("{}: group needs perl=", at())),
                entries: Vec::new(),
            });
            continue;
        }
        let [name, value] = words[..] else {
            panic!("{}: expected NAME VALUE", at());
        };
        let value: i64 = value
            .parse()
            .unwrap_or_else(|_| panic!("{}: {value:?} is not an integer", at()));
        let group = groups
            .last_mut()
            .unwrap_or_else(|| panic!("{}: constant before any group", at()));
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
            "{}: {name} is not an upper-case name",
            at()
        );
        assert!(
            group.entries.iter().all(|(n, _)| n != name),
            "{}: {name} is defined twice in group {}",
            at(),
            group.name
        );
        group.entries.push((name.to_string(), value));
    }
    groups
}

/// Slots of one object must not share a number.  The base layout ("slot")
/// is shared by every class; each other slot group belongs to one subclass.
fn check_slots(groups: &[Group]) -> i64 {
    let base = groups
        .iter()
        .find(|g| g.name == "slot")
        .expect("constants.def has a slot group");
    let mut count = 0;
    for g in groups.iter().filter(|g| g.name.ends_with("slot")) {
        let mut seen = std::collections::HashMap::new();
        let members = if g.name == "slot" {
            vec![g]
        } else {
            vec![base, g]
        };
        for (name, value) in members.iter().flat_map(|m| m.entries.iter()) {
            assert!(*value >= 0, "{CONSTANTS}: slot {name} is negative");
            if let Some(other) = seen.insert(*value, name) {
                panic!(
                    "{CONSTANTS}: slots {other} and {name} ({}) share number {value}",
                    g.name
                );
            }
            count = count.max(value + 1);
        }
    }
    count
}

fn generate_constants(out_dir: &std::path::Path) {
    let text = std::fs::read_to_string(CONSTANTS)
        .unwrap_or_else(|e| panic!("cannot read {CONSTANTS}: {e}"));
    let groups = parse_constants(&text);
    let slot_count = check_slots(&groups);

    let banner = format!("Generated by build.rs from {CONSTANTS}; edit that file instead.");
    let mut rs = format!("// {banner}\n");
    let mut h = format!("/* {banner} */\n#ifndef PAGI_CONSTANTS_H\n#define PAGI_CONSTANTS_H\n");
    let mut pm = format!(
        "package PAGI::RS::Constants;\n\n# {banner}\n#\n\
         # use PAGI::RS::Constants qw(group ...) makes each constant of those\n\
         # groups a constant of the calling package.\n\n\
         use strict;\nuse warnings;\nrequire constant;\n\nour %GROUPS = (\n"
    );
    for g in &groups {
        rs.push_str(&format!("pub mod {} {{\n", g.name));
        pm.push_str(&format!("    {} => {{\n", g.name));
        for (name, value) in &g.entries {
            rs.push_str(&format!("    pub const {name}: i32 = {value};\n"));
            if let Some(prefix) = &g.c_prefix {
                h.push_str(&format!("#define {prefix}{name} ({value})\n"));
            }
            pm.push_str(&format!("        {}{name} => {value},\n", g.perl_prefix));
        }
        rs.push_str("}\n");
        pm.push_str("    },\n");
    }
    rs.push_str(&format!(
        "/// One more than the highest slot number.\npub const SLOT_COUNT: i32 = {slot_count};\n"
    ));
    h.push_str(&format!("#define SLOT_COUNT ({slot_count})\n#endif\n"));
    pm.push_str(
        r#");

sub import {
    my ( $class, @groups ) = @_;
    my $pkg = caller;
    for my $group (@groups) {
        my $set = $GROUPS{$group}
          or die "PAGI::RS::Constants: no group '$group' (see src/interp/constants.def)\n";
        # constant->import defines its constants in its caller's package.
        eval "package $pkg; constant->import(\$set); 1" or die $@;
    }
    return;
}

1;
"#,
    );
    for (name, content) in [
        ("constants.rs", rs),
        ("constants.h", h),
        ("Constants.pm", pm),
    ] {
        let path = out_dir.join(name);
        std::fs::write(&path, content)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}
