# A file body that does not fit the app's Content-Length fails the send
# with a clear message; before any byte was sent the app can still recover.
use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);

my $dir  = tempdir( CLEANUP => 1 );
my $file = "$dir/big.txt";
open my $fh, '>', $file or die;
print $fh 'y' x 100;
close $fh;

my $app = write_app(<<"APP");
use strict; use warnings; use Future::AsyncAwait;
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    await \$send->({ type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ], [ 'content-length', 10 ] ] });
    my \$ok = eval { await \$send->({ type => 'http.response.body', file => '$file' }); 1 };
    my \$err = \$\@ // '';
    \$err =~ s/\\s+\\z//;
    # Nothing was sent: the response can still be completed differently.
    await \$send->({ type => 'http.response.body', body => \$ok ? 'NOTFAILED' : 'recovered!' });
    warn "send error: \$err\\n";
};
\$app;
APP

my $server = start_server($app);
my $res    = http_request( $server->port, 'GET', '/' );
is $res->{status}, 200, 'the response is a 200';
is $res->{body}, 'recovered!', 'the file send failed and the app sent its own 10 bytes instead';
ok $server->wait_output(qr/send error: .*longer than the declared Content-Length of 10/),
  'the failure says the file is longer than the Content-Length';
is $server->stop('TERM'), 0, 'clean exit';
done_testing;
