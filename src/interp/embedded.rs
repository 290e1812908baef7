//! The Perl half of the bridge, compiled into the binary so that an installed
//! pagi-rs needs no separate library path.  An @INC hook (see BOOTSTRAP)
//! serves these sources by their `require` names.

const SOURCES: &[(&str, &str)] = &[
    (
        "PAGI/RS/Bridge.pm",
        include_str!("../../perl/PAGI/RS/Bridge.pm"),
    ),
    (
        "PAGI/RS/HTTP.pm",
        include_str!("../../perl/PAGI/RS/HTTP.pm"),
    ),
    ("PAGI/RS/SSE.pm", include_str!("../../perl/PAGI/RS/SSE.pm")),
    (
        "PAGI/RS/WebSocket.pm",
        include_str!("../../perl/PAGI/RS/WebSocket.pm"),
    ),
    (
        "PAGI/RS/Connection.pm",
        include_str!("../../perl/PAGI/RS/Connection.pm"),
    ),
    (
        "PAGI/RS/Transport.pm",
        include_str!("../../perl/PAGI/RS/Transport.pm"),
    ),
    (
        "PAGI/RS/Lifespan.pm",
        include_str!("../../perl/PAGI/RS/Lifespan.pm"),
    ),
    (
        "PAGI/RS/Loader.pm",
        include_str!("../../perl/PAGI/RS/Loader.pm"),
    ),
    (
        "PAGI/RS/FutureIO.pm",
        include_str!("../../perl/PAGI/RS/FutureIO.pm"),
    ),
];

pub fn source(name: &[u8]) -> Option<&'static str> {
    SOURCES
        .iter()
        .find(|(n, _)| n.as_bytes() == name)
        .map(|(_, s)| *s)
}

/// Evaluated first in every interpreter: serve the embedded modules, then
/// load the bridge.
pub const BOOTSTRAP: &str = r#"
use strict;
use warnings;
unshift @INC, sub {
    my (undef, $file) = @_;
    return unless $file =~ m{^PAGI/RS/};
    my $src = PAGI::RS::_embedded_source($file);
    return unless defined $src;
    open my $fh, '<', \$src or die "cannot read embedded $file: $!";
    return $fh;
};
require PAGI::RS::Bridge;
1;
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn every_module_is_embedded() {
        for name in ["PAGI/RS/Bridge.pm", "PAGI/RS/HTTP.pm", "PAGI/RS/Loader.pm"] {
            assert!(super::source(name.as_bytes()).is_some(), "{name}");
        }
        assert!(super::source(b"PAGI/RS/Nope.pm").is_none());
    }
}
