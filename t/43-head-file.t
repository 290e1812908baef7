# HEAD with a `file` (or `fh`) body: no bytes on the wire, the response
# completes normally, the connection stays usable, nothing is logged as an
# incomplete response.
use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);

my $dir  = tempdir( CLEANUP => 1 );
my $file = "$dir/data.txt";
open my $fh, '>', $file or die;
print $fh 'x' x 5000;
close $fh;

my $app = write_app(<<"APP");
use strict; use warnings; use Future::AsyncAwait;
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$conn = \$scope->{'pagi.connection'};
    await \$send->({ type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ], [ 'content-length', 5000 ] ] });
    if (\$scope->{path} eq '/fh') {
        open my \$h, '<', '$file' or die;
        await \$send->({ type => 'http.response.body', fh => \$h });
        close \$h;
    } else {
        await \$send->({ type => 'http.response.body', file => '$file' });
    }
    die "response not complete\\n" unless \$conn->response_complete;
};
\$app;
APP

my $server = start_server($app);
my $port   = $server->port;
for my $path ( '/file', '/fh' ) {
    my $req = "HEAD $path HTTP/1.1\r\nHost: x\r\n\r\nGET $path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    my $raw = raw_request( $port, $req, timeout => 5 );
    # A HEAD response ends with its head, whatever its content-length says.
    my $end = index( $raw, "\r\n\r\n" );
    my $head = parse_response( substr( $raw, 0, $end + 4 ) );
    is $head->{status}, 200, "HEAD $path: 200";
    is $head->{headers}{'content-length'}[0], 5000, "HEAD $path: the app's content-length passes through";
    my $after = substr( $raw, $end + 4 );
    like $after, qr{\AHTTP/1\.1 200 }, "HEAD $path: no body bytes, the next response follows on the same connection";
    my $get = parse_response($after);
    is $get && $get->{status}, 200, "GET $path after it: 200";
    is $get && length( $get->{body} ), 5000, "GET $path after it: the whole file";
}
unlike $server->output, qr/incomplete response|application error/, 'nothing logged as incomplete or failed';
is $server->stop('TERM'), 0, 'clean exit';
done_testing;
