use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

# The bounded app fuzzer (bench/bin/app-fuzz) against the real binary: an
# app that acts out random programs of sound and broken events (HTTP, SSE,
# WebSocket), sends left un-awaited or cancelled, receives, sleeps and
# deaths.  After each case the wire must be well formed (no header or SSE
# field injected, framing intact, the pipelined probe answered after the
# app's response and nothing else), the server must be up and answer a
# probe, and once the client has gone every app call and every Future it
# was given must settle.  30 s here, then 10 s over TLS; by hand (or in a
# soak) give it longer.
# A failure prints the seed and the case to replay.

my $fuzz = "$FindBin::Bin/../bench/bin/app-fuzz";
$ENV{PAGI_RS_BIN} = pagi_bin();

my $self = `$^X $fuzz --self-check 2>&1`;
is $? >> 8, 0, 'the wire checks give the known verdicts' or diag $self;
like $self, qr/^ok - an injected header: malformed/m, 'an injected header is a violation';
like $self, qr/^ok - an SSE injection: /m, 'so is an injected SSE field';

my $out = run_fuzzer( 'app-fuzz', $fuzz, '--duration', 30 );
my ($cases) = $out =~ /(\d+) cases in [\d.]+ s/;
ok $cases && $cases >= 200, 'it ran a fair number of cases (' . ( $cases // 0 ) . ')';
for my $kind (qw(http sse websocket)) {
    like $out, qr/outcomes: .*\b$kind 200\b|outcomes: .*\b$kind 101\b/, "among them $kind responses";
}
like $out, qr/outcomes: .*\bhttp 500\b/, 'and apps that died before answering';
like $out, qr/^app-fuzz: (\d+) app calls, \1 settled$/m, 'every app call settled';
note $out;

# Over TLS (HTTP/1.1 by ALPN): the TLS writer and its shutdown under the
# same apps.
$out = run_fuzzer( 'app-fuzz', $fuzz, '--tls', '--duration', 10 );
like $out, qr/^app-fuzz: seed \d+, TLS, /m, 'it spoke TLS';
($cases) = $out =~ /(\d+) cases in [\d.]+ s/;
ok $cases && $cases >= 50, 'it ran a fair number of cases over TLS (' . ( $cases // 0 ) . ')';
like $out, qr/^app-fuzz: (\d+) app calls, \1 settled$/m, 'every app call settled';
note $out;
done_testing;
