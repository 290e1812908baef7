use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);

# An http request's $send and $receive that nothing but the server holds
# when the request ends are kept and bound to the next request
# (src/interp/c/bound_sub.c).  The application must not be able to tell:
# a sub it holds (strongly or weakly) or changed (blessed, renamed, given a
# prototype) is never handed to another request, a held one stays its own
# request's, and every request's subs send and receive for it alone.

my $app = write_app( <<'PERL', 'spare_subs.pl' );
use strict; use warnings; use Future::AsyncAwait; use Future::IO; use JSON::PP ();
use Scalar::Util qw(weaken blessed refaddr set_prototype);
use Sub::Util qw(set_subname subname);
my (@held, $weak_send, $weak_receive, $release);
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my ($kept, $reused) = PAGI::RS::_spare_sub_stats();
    my %d = (
        kept => $kept, reused => $reused,
        send => refaddr($send), receive => refaddr($receive),
        plain => ( ref $send eq 'CODE' && ref $receive eq 'CODE'
            && !defined prototype($send) && !defined prototype($receive)
            && subname($send) eq 'PAGI::RS::HTTP::__ANON__'
            && subname($receive) eq 'PAGI::RS::HTTP::__ANON__' ) ? 1 : 0,
    );
    my $path = $scope->{path};
    if    ($path eq '/hold')       { push @held, [ $send, $receive ] }
    elsif ($path eq '/held')       { $d{held} = [ map { [ map { refaddr $_ } @$_ ] } @held ] }
    elsif ($path eq '/use-held')   {
        # The held $send belongs to a request long over: whatever it does,
        # it must not reach this request's response.
        my $f = eval { $held[0][0]->({ type => 'http.response.body', body => 'STRAY', more => 0 }) };
        $d{held_send} = !$f ? 'died' : eval { $f->get; 'done' } // 'failed';
        $f = eval { $held[0][1]->() };
        $d{held_receive} = !$f ? 'died' : eval { my $e = $f->get; $e->{type} } // 'failed';
    }
    elsif ($path eq '/weak')       { $weak_send = $send; $weak_receive = $receive; weaken $_ for $weak_send, $weak_receive }
    elsif ($path eq '/weak-check') { $d{weak} = [ map { defined $_ ? 1 : 0 } $weak_send, $weak_receive ] }
    elsif ($path eq '/bless')      { bless $send, 'Some::Class'; bless $receive, 'Some::Class' }
    elsif ($path eq '/prototype')  { &set_prototype($send, '$'); &set_prototype($receive, '$$') }
    elsif ($path eq '/name')       { set_subname 'Some::name', $send; set_subname 'Some::other', $receive }
    elsif ($path eq '/slow')       {
        # Waits for /release (or 10 s), so that the test's other requests
        # all come while it waits, however slow the build.
        $release = Future->new;
        await Future->wait_any( $release, Future::IO->sleep(10) );
    }
    elsif ($path eq '/waiting')    { $d{waiting} = $release && !$release->is_ready ? 1 : 0 }
    elsif ($path eq '/release')    { $release->done if $release && !$release->is_ready }
    elsif ($path eq '/body')       {
        my $body = '';
        while (1) {
            my $e = await $receive->();
            $body .= $e->{body} // '';
            last unless $e->{more};
        }
        $d{body} = $body;
    }
    my $out = JSON::PP->new->canonical->encode(\%d);
    await $send->({type => 'http.response.start', status => 200,
        headers => [['content-type', 'application/json'], ['content-length', length $out]]});
    await $send->({type => 'http.response.body', body => $out});
};
$app;
PERL

my $s    = start_server($app);
my $port = $s->port;
my $sock = connect_port($port);

sub ask { ask_json( $sock, @_ ) }

sub post {
    my ( $conn, $body ) = @_;
    $conn->syswrite( "POST /body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
          . length($body) . "\r\n\r\n$body" );
    my ($buf) = read_sock( $conn, qr/\r\n\r\n.*\}/s, 5 );
    my ($json) = $buf =~ /(\{.*\})/s or return {};
    return JSON::PP->new->decode($json);
}

subtest 'a request\'s subs are kept and bound to the next' => sub {
    my $first = ask('/plain');
    ok $first->{plain}, 'plain code references';
    my $last;
    $last = ask('/plain') for 1 .. 10;
    ok $last->{plain}, 'still plain';
    # $send and $receive each, nearly every request.
    cmp_ok $last->{kept} - $first->{kept},     '>=', 2 * 9, 'kept at the end of each request';
    cmp_ok $last->{reused} - $first->{reused}, '>=', 2 * 9, 'and taken by the next';
    is $last->{send}, ask('/plain')->{send}, 'the same $send again';
};

subtest 'subs the app holds stay their own request\'s' => sub {
    my $held = ask('/hold');
    my @after = map { ask('/plain') } 1 .. 3;
    isnt $_->{send},    $held->{send},    'a later request has another $send'    for @after;
    isnt $_->{receive}, $held->{receive}, 'and another $receive' for @after;
    my $d = ask('/held');
    is_deeply $d->{held}, [ [ $held->{send}, $held->{receive} ] ], 'the held subs are those the app got';
    # Read raw: a stray body from the held $send would show in the bytes.
    $sock->syswrite("GET /use-held HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    my ($raw) = read_sock( $sock, qr/\}/, 5 );
    read_some( $sock, \$raw, time + 0.3 );
    unlike $raw, qr/STRAY/, 'nothing the held $send was given reached the wire';
    my ($json) = $raw =~ /(\{.*\})/s;
    $d = JSON::PP->new->decode( $json // '{}' );
    ok $d->{plain}, 'this request answered with its own subs' or diag explain $d;
    note "the held \$send: $d->{held_send}";
    is $d->{held_receive}, 'http.disconnect', 'the held $receive reports its own request\'s end';
    my $next = ask('/plain');
    ok $next->{plain}, 'and the next request is whole';
};

subtest 'weak references to the subs go undef when the request ends' => sub {
    ask('/weak');
    ask('/plain');
    is_deeply ask('/weak-check')->{weak}, [ 0, 0 ], 'neither is a later request\'s';
};

subtest 'subs the app changed are not handed on' => sub {
    for my $change (qw(bless prototype name)) {
        ask("/$change");
        ok ask('/plain')->{plain}, "after /$change, request $_ gets plain subs" for 1 .. 2;
    }
};

subtest 'each request\'s $receive reads its own body' => sub {
    for my $body ( 'first', 'x' x 5000, 'third', '' ) {
        is post( $sock, $body )->{body}, $body, length($body) . ' bytes';
    }
};

subtest 'a request waiting keeps its subs while others come and go' => sub {
    my $slow = connect_port($port);
    $slow->syswrite("GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    # Requests on another connection may overtake it; those before it
    # started may rightly have handed it their subs.
    my ( $t0, $waiting ) = (time);
    sleep 0.01 until ( $waiting = ask('/waiting')->{waiting} ) || time - $t0 > 5;
    ok $waiting, '/slow is waiting';
    my @fast = map { ask('/plain') } 1 .. 5;
    ok $_->{plain}, 'a request while /slow waits' for @fast;
    is post( $sock, "body $_" )->{body}, "body $_", "a body while /slow waits ($_)" for 1 .. 2;
    ok ask('/release')->{plain}, 'and the request that ends the wait';
    my ($buf) = read_sock( $slow, qr/\}/, 5 );
    my ($json) = $buf =~ /(\{.*\})/s;
    my $d = JSON::PP->new->decode( $json // '{}' );
    ok $d->{plain}, '/slow answered with its own subs, after the wait';
    isnt $d->{send}, $_->{send}, 'not one a request during its wait had' for @fast;
};

$s->stop;
done_testing;
