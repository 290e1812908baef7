use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

my $server = start_server( "$FindBin::Bin/../examples/hello/app.pl" );
my $res = http_request( $server->port, 'GET', '/' );
is $res->{status}, 200, 'hello answers 200';
is $res->{body}, 'Hello, World!', 'with its body';
like $server->output, qr{listening on http://127\.0\.0\.1:\d+/}, 'startup line names the address';
is $server->stop('TERM'), 0, 'SIGTERM exits 0';
done_testing;
