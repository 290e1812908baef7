use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::SSE;
use File::Temp qw(tempdir);

# The access log says what was sent and cannot be forged: an sse.close
# reason (the app's text) with a newline stays inside its one line, escaped;
# a header's quote and bytes that are not UTF-8 are shown exactly.

my $dir = tempdir( CLEANUP => 1 );
my $app = write_app( <<'PERL' );
use strict; use warnings; use Future::AsyncAwait;
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    if ($scope->{type} eq 'sse') {
        await $send->({ type => 'sse.start' });
        await $send->({ type => 'sse.close', reason => "done\n127.0.0.1 - - [FORGED] \"GET /admin\" 200" });
        return;
    }
    await $send->({ type => 'http.response.start', status => 200, headers => [['content-length', 2]] });
    await $send->({ type => 'http.response.body', body => 'ok' });
};
$app;
PERL
my $log = "$dir/access.log";
my $s   = start_server( '--access-log', $log, '--access-log-format', 'combined', $app );

my $c = PagiRS::SSE->open( $s->port, '/stream' );
ok $c->wait_eof(5), 'the stream ended';
raw_request( $s->port, "GET /x HTTP/1.1\r\nHost: x\r\nUser-Agent: a\xffb\"q\r\nConnection: close\r\n\r\n" );

my @lines = wait_file_lines( $log, 2 );
is scalar(@lines), 2, 'two requests, two lines';
ok !( grep { /^127\.0\.0\.1 - - \[FORGED\]/ } @lines ), 'the reason did not forge a line';
like $lines[0], qr/reason=done\\x0a127\.0\.0\.1 - - \[FORGED\] \\"GET \/admin\\" 200$/, 'the reason, escaped, on its own line';
like $lines[1], qr/"a\\xffb\\"q"$/, 'a header\'s byte that is not UTF-8, and its quote, are escaped';
$s->stop;

done_testing;
