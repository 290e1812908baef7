use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use File::Temp qw(tempdir);
use JSON::PP;
use Time::HiRes qw(time sleep);

# WebSocket hardening: the opening handshake is held to RFC 6455 4.2.1
# (answered by the server, the app never called).

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical->utf8->allow_nonref;

my $app = write_app( <<"APP" );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP;
my \$dir = '$dir';
my \$J = JSON::PP->new->canonical->utf8->allow_nonref;
sub rec {
    my (\$file, \$data) = \@_;
    open my \$fh, '>>', "\$dir/\$file" or die "open \$dir/\$file: \$!";
    print \$fh \$J->encode(\$data), "\\n";
    close \$fh;
}
sub query { my (\$s) = \@_; return { map { split /=/, \$_, 2 } split /&/, \$s->{query_string} // '' } }
sub facts {
    my (\$c) = \@_;
    return { reason => \$c->disconnect_reason, detail => \$c->disconnect_detail };
}
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    rec('calls', { type => \$scope->{type}, path => \$scope->{path} });
    if (\$scope->{type} ne 'websocket') {
        await \$send->({ type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']] });
        await \$send->({ type => 'http.response.body', body => "http:\$scope->{type}", more => 0 });
        return;
    }
    my \$path = \$scope->{path};
    my \$q    = query(\$scope);
    my \$c    = \$scope->{'pagi.connection'};
    await \$receive->();    # websocket.connect
    await \$send->({ type => 'websocket.accept' });

    if (\$path eq '/sizes') {
        # Answers each message with its length; records how it ended.
        while (1) {
            my \$ev = await \$receive->();
            if (\$ev->{type} eq 'websocket.disconnect') {
                rec("\$q->{name}.end", { event => \$ev, facts => facts(\$c) });
                return;
            }
            await \$send->({ type => 'websocket.send', text => 'len:' . length(\$ev->{bytes} // \$ev->{text}) });
        }
    }
    await \$send->({ type => 'websocket.close' });
};
APP

sub records { map { $J->decode($_) } file_lines("$dir/$_[0]") }

sub wait_record {
    my ( $name, $timeout ) = @_;
    my ($r) = wait_file_lines( "$dir/$name", 1, $timeout // 5 );
    return $r ? $J->decode($r) : undef;
}

# ---------------------------------------------------------------------------
# The opening handshake (RFC 6455 4.2.1)
# ---------------------------------------------------------------------------

my $log = "$dir/access.log";
my $hs  = start_server( '--access-log', $log, $app );

# Each malformed attempt: what it sends, and the answer it must get.
my @malformed = (
    [ 'post',        { method => 'POST' },                                    400, qr/GET/ ],
    [ 'put',         { method => 'PUT' },                                     400, qr/GET/ ],
    [ 'no-key',      { omit => ['Sec-WebSocket-Key'] },                       400, qr/Sec-WebSocket-Key/ ],
    [ 'short-key',   { key => 'c2hvcnQ=' },                                   400, qr/Sec-WebSocket-Key/ ],
    [ 'long-key',    { key => 'dGhlIHNhbXBsZSBub25jZSE=' },                   400, qr/Sec-WebSocket-Key/ ],
    [ 'not-base64',  { key => 'this is not base64!!!!==' },                   400, qr/Sec-WebSocket-Key/ ],
    [ 'two-keys',    { headers => [ [ 'Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ==' ], [ 'Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ==' ] ] },
                     400, qr/Sec-WebSocket-Key/ ],
    [ 'version-8',   { version => 8 },                                        426, qr/13/ ],
    [ 'version-14',  { version => 14 },                                       426, qr/13/ ],
    [ 'no-version',  { omit => ['Sec-WebSocket-Version'] },                   426, qr/13/ ],
);

for my $case (@malformed) {
    my ( $name, $opts, $status, $says ) = @$case;
    subtest "malformed handshake: $name => $status" => sub {
        my $ws = PagiRS::WS->connect( $hs->port, path => "/bad-$name", check_accept => 0, %$opts );
        ok !$ws->upgraded, 'not upgraded';
        is $ws->status, $status, "status $status";
        is $ws->header('content-type'), 'text/plain', 'text/plain';
        like $ws->header('connection') // '', qr/\bclose\b/i, 'Connection: close';
        like $ws->body, $says, 'the body names the rule: ' . $ws->body;
        if ( $status == 426 ) {
            is $ws->header('sec-websocket-version'), '13', 'Sec-WebSocket-Version: 13';
            is $ws->header('upgrade'), 'websocket', 'Upgrade: websocket (RFC 9110: a 426 names the protocol)';
            like $ws->header('connection'), qr/\bupgrade\b/i, 'with the upgrade token in Connection';
        }
        ok $ws->eof_within(3), 'the server closed the connection';
    };
}

subtest 'the app is never called for a malformed handshake; each is in the access log' => sub {
    # An ordinary request after them: the interpreter takes requests in
    # order, so once the app has seen it, it would have seen the others.
    my $r = http_request( $hs->port, 'GET', '/marker' );
    is $r->{body}, 'http:http', 'an ordinary request is served';
    my @calls = map { $_->{path} } records('calls');
    is_deeply \@calls, ['/marker'], 'the app saw only the ordinary request';
    my @lines = wait_file_lines( $log, scalar(@malformed) + 1, 5 );
    for my $case (@malformed) {
        my ( $name, $opts, $status ) = @$case;
        my $method = $opts->{method} // 'GET';
        ok( ( grep { m{"\Q$method\E /bad-\Q$name\E[^"]*" $status } } @lines ), "logged: $method /bad-$name $status" );
    }
};

subtest 'a well-formed handshake still upgrades; a request that is not an attempt is http' => sub {
    my $ws = PagiRS::WS->connect( $hs->port, path => '/sizes?name=ok' );
    ok $ws->upgraded, 'upgraded';
    $ws->close(1000);
    $ws->wait_close(3);
    # No Upgrade/Connection pair: no handshake attempt, no key needed.
    my $r = http_request( $hs->port, 'GET', '/plain', headers => [ [ 'Sec-WebSocket-Version', '8' ] ] );
    is $r->{status}, 200, 'a plain request with a stray WebSocket header is http';
};

done_testing;
