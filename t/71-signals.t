# An app that installs a Perl signal handler must not crash the server when
# the signal lands on a network thread (Perl's handler needs an interpreter):
# the signal is forwarded to the interpreter and the app's handler runs.
use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use Time::HiRes qw(sleep time);

my $dir  = tempdir( CLEANUP => 1 );
my $seen = "$dir/usr1";
my $app  = write_app(<<"APP");
use strict; use warnings; use Future::AsyncAwait;
my \$count = 0;
\$SIG{USR1} = sub {
    \$count++;
    open my \$fh, '>', '$seen' or die; print \$fh \$count; close \$fh;
};
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    await \$send->({ type => 'http.response.start', status => 200, headers => [] });
    await \$send->({ type => 'http.response.body', body => "count=\$count" });
};
\$app;
APP

my $server = start_server($app);
my $res = http_request( $server->port, 'GET', '/' );
is $res->{status}, 200, 'serving before any signal';

# Many signals while requests are in flight: some land on tokio threads.
for ( 1 .. 20 ) {
    kill 'USR1', $server->pid;
    my $r = http_request( $server->port, 'GET', '/' );
    last unless $r->{status} == 200;
    sleep 0.02;
}
ok $server->is_running, 'server survived 20 USR1 signals';

my $deadline = time + 5;
sleep 0.1 while time < $deadline && !( -s $seen );
ok -s $seen, "the app's own USR1 handler ran";
my $after = http_request( $server->port, 'GET', '/' );
is $after->{status}, 200, 'still serving afterwards';
like $after->{body}, qr/^count=[1-9]\d*$/, "the handler's count is visible to requests ($after->{body})";
is $server->stop('TERM'), 0, 'SIGTERM still shuts down cleanly (exit 0)';
done_testing;
