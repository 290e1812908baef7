use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::H2;

# The bounded WebSocket fuzzer (bench/bin/ws-fuzz) against the real binary:
# client conversations of whole and fragmented messages, pings and Closes,
# mutated (reserved bits and opcodes, unmasked and oversized frames, bad
# UTF-8 and close codes, frames dropped, repeated and swapped, byte flips,
# truncation), each judged by a strict RFC 6455 reader: the app gets
# exactly the messages sent before the end and then the right
# websocket.disconnect code, the server's Close carries it, the connection
# closes, a probe is answered, RSS stays bounded and every app call
# returns.  In a quarter of the cases the app closes the socket itself
# after a few messages: then it gets a beginning of those messages, and
# the server's Close is the app's unless the peer's Close or a failure
# came first; in one in fifteen it waits before receiving, and may be
# given a beginning of the messages and 1008 queue_overflow.  Over
# HTTP/1.1 (cleartext and TLS) and HTTP/2 (RFC 8441).
# A failure prints the seed and the case to replay.

PagiRS::H2->require_client;
my $python = PagiRS::H2::h2_python();
my $fuzz   = "$FindBin::Bin/../bench/bin/ws-fuzz";
$ENV{PAGI_RS_BIN} = pagi_bin();

my $self = `$python $fuzz --self-check 2>&1`;
is $? >> 8, 0, "the judge's verdicts hold, the server agrees, and a wrong expectation is reported"
  or diag $self;
like $self, qr/^ok - a message the app did not get is reported$/m, 'a lost message is reported';
like $self, qr/^ok - a code the app was not given is reported$/m,  'a wrong code is reported';
like $self, qr/^ok - a Close that is not the app's, after the app's Close, is reported$/m,
  "a Close that is not the app's is reported";

for my $run ( [ 'HTTP/1.1', 20 ], [ 'HTTP/1.1 over TLS', 8, '--tls' ], [ 'HTTP/2', 10, '--http2' ] ) {
    my ( $name, $duration, @options ) = @$run;
    subtest "$name, $duration s" => sub {
        my $out  = `$python $fuzz --duration $duration @options 2>&1`;
        my $exit = $? >> 8;
        is $exit, 0, 'no violation' or diag $out;
        like $out, qr/^ws-fuzz: PASS$/m, 'the summary says PASS';
        my ($seed) = $out =~ /seed (\d+)/;
        ok defined $seed, 'the seed is printed' and note "seed $seed";
        my ( $cases, $calls, $messages ) =
          $out =~ /(\d+) cases in [\d.]+ s \(seed \d+\); (\d+) app calls, all returned: yes; (\d+) messages/;
        ok $cases && $cases >= 5 * $duration, 'it ran a fair number of cases (' . ( $cases // 0 ) . ')';
        ok $messages && $messages > $cases / 2, 'messages reached the app (' . ( $messages // 0 ) . ')';
        my ($endings) = $out =~ /^ws-fuzz: right endings: (.*)$/m;
        like $endings // '', qr/fail 1002 .*fail 1007 .*fail 1009 /, 'failures of each kind were judged';
        like $endings // '', qr/close 1000 /,                           'and peer Closes';
        my ($closed) = $out =~ /the app closed first in (\d+) cases/;
        ok $closed, 'the app closed first in some cases (' . ( $closed // 0 ) . ')';
        like $out, qr/^ws-fuzz: plans: .*stall x[1-9]/m, 'and stalled in some';
        note $out;
    };
}
done_testing;
