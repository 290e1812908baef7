use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::H2;

# The bounded HTTP/2 fuzzer (bench/bin/h2-fuzz) against the real binary:
# mutated h2c conversations (frames dropped, repeated, reordered and
# corrupted; bad pseudo-headers and fields; broken WebSocket frames over an
# extended CONNECT), each on a fresh connection.  After each case the
# server closed it once the client shut its side, still answers a probe,
# has not panicked and never gave the app a malformed request; its RSS
# stays within 64 MiB of the start, and at the end every app call has
# returned (no $receive or $send left pending by a broken stream).  20 s
# over h2c and 12 s over TLS here; by hand, give it longer.  A failure prints the seed and the case
# to replay.

PagiRS::H2->require_client;
my $python = PagiRS::H2::h2_python();
my $fuzz   = "$FindBin::Bin/../bench/bin/h2-fuzz";
$ENV{PAGI_RS_BIN} = pagi_bin();

my $self = `$python $fuzz --self-check 2>&1`;
is $? >> 8, 0, 'the checks can fail: an unmutated case of each kind, a call that never returns'
  or diag $self;
like $self, qr/^ok - a call that never returns is reported/m, 'a leaked call is reported';
like $self, qr/^ok - \.\.\. and reached the app at \/ws$/m, 'a WebSocket over HTTP/2 reaches the app';

for my $run ( [ 'h2c', 20 ], [ 'TLS', 12, '--tls' ] ) {
    my ( $name, $duration, @options ) = @$run;
    subtest "$name, $duration s" => sub {
        my $out  = `$python $fuzz --duration $duration @options 2>&1`;
        my $exit = $? >> 8;
        is $exit, 0, 'no violation' or diag $out;
        like $out, qr/^h2-fuzz: PASS$/m, 'the summary says PASS';
        my ($seed) = $out =~ /seed (\d+)/;
        ok defined $seed, 'the seed is printed' and note "seed $seed";
        my ( $cases, $calls ) = $out =~ /(\d+) cases in [\d.]+ s \(seed \d+\); (\d+) app calls, all returned: yes/;
        ok $cases && $cases >= 5 * $duration, 'it ran a fair number of cases (' . ( $cases // 0 ) . ')';
        ok $calls && $calls > $cases, 'cases reached the app besides the probes (' . ( $calls // 0 ) . ' calls)';
        my ($ws) = $out =~ /websocket \/ws x(\d+)/;
        ok $ws && $ws > 0, 'WebSockets among them (' . ( $ws // 0 ) . ')';
        note $out;
    };
}
my $tls_self = `$python $fuzz --self-check --tls 2>&1`;
is $? >> 8, 0, 'over TLS too, an unmutated case of each kind reaches the app' or diag $tls_self;
done_testing;
