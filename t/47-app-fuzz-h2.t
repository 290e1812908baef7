use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::H2;

# The bounded app fuzzer (bench/bin/app-fuzz --http2) over h2c: the same
# programs of sound and broken events as t/47-app-fuzz.t, each case a
# stream on a fresh connection with a probe stream beside it, read by a
# strict HTTP/2 client (bench/lib/app_fuzz_h2.py on Python's h2).  Whatever
# one stream's app does, the frames must be well formed (h2 refuses the
# whole connection otherwise), no field or SSE line injected, no body on
# HEAD, 204 or 304, no GOAWAY, the probe beside it answered, a stream over
# once its app has returned, no send stuck while the client reads, and
# every app call and Future settled once the client has gone.  20 s here,
# then 10 s of h2 over TLS.
# A failure prints the seed and the case to replay (with --http2).

PagiRS::H2->require_client;
local $ENV{PAGI_RS_PYTHON} = PagiRS::H2::h2_python();

my $self = `$ENV{PAGI_RS_PYTHON} $FindBin::Bin/../bench/lib/app_fuzz_h2.py --self-check 2>&1`;
is $? >> 8, 0, "the HTTP/2 client's checks give the known verdicts" or diag $self;
like $self, qr/^ok - an injected header: a header the app/m, 'an injected header is a violation';

my $out = run_fuzzer( 'app-fuzz', "$FindBin::Bin/../bench/bin/app-fuzz", '--http2', '--duration', 20 );
like $out, qr/^app-fuzz: seed \d+, HTTP\/2, /m, 'it spoke HTTP/2';
my ($cases) = $out =~ /(\d+) cases in [\d.]+ s/;
ok $cases && $cases >= 150, 'it ran a fair number of cases (' . ( $cases // 0 ) . ')';
like $out, qr/outcomes: .*\bhttp 200\b/,            'among them HTTP responses';
like $out, qr/outcomes: .*\bsse 200\b/,             'SSE streams';
like $out, qr/outcomes: .*\bwebsocket accepted\b/,  'WebSockets accepted over extended CONNECT';
like $out, qr/outcomes: .*\bhttp 500\b/,            'and apps that died before answering';
like $out, qr/^app-fuzz: (\d+) app calls, \1 settled$/m, 'every app call settled';
note $out;

# h2 over TLS (ALPN): the same through the TLS writer.
$out = run_fuzzer( 'app-fuzz', "$FindBin::Bin/../bench/bin/app-fuzz", '--http2', '--tls', '--duration', 10 );
like $out, qr/^app-fuzz: seed \d+, HTTP\/2, TLS, /m, 'it spoke HTTP/2 over TLS';
($cases) = $out =~ /(\d+) cases in [\d.]+ s/;
ok $cases && $cases >= 50, 'it ran a fair number of cases over TLS (' . ( $cases // 0 ) . ')';
like $out, qr/^app-fuzz: (\d+) app calls, \1 settled$/m, 'every app call settled';
note $out;
done_testing;
