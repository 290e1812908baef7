package AppFuzz;

# The programs of bench/bin/app-fuzz: what a buggy app does with $send and
# $receive, drawn at random but reproducibly from (seed, case).
#
# Both sides load this module.  The fuzzer calls program() to know what it
# is about to provoke (the kind of request to send, the header names the
# app may put on the wire); the app the fuzzer starts calls run() with the
# same seed and case, taken from the request's path, and acts the program
# out: events of every type the Www spec names, well formed and not (bad
# statuses, header names and values carrying CR/LF, wide characters, refs
# where strings belong, bodies past a declared length, files that are not
# there, close codes out of range, ...), sends after the response ended,
# sends and receives left un-awaited or cancelled, sleeps, and dying at any
# point.  Whatever the app does, the server must keep the wire well formed
# and every Future the app was given must settle.

use strict;
use warnings;

our $INJECTED = 'x-injected';

# A small LCG: the same numbers in the fuzzer and in the app, whatever the
# perl's own rand.
sub new_rng {
    my ($seed) = @_;
    my $state = $seed & 0x7fffffff;
    return sub {
        $state = ( $state * 1103515245 + 12345 ) & 0x7fffffff;
        return $state / 0x80000000;
    };
}

# The program of one case: {kind, method, request_body, offer (websocket
# subprotocols), pipeline (a probe request follows), steps => [[op, ...],
# ...]}.  $files names the fixtures the
# fuzzer made: {ok => path of a small file, big => path of one larger than
# a file producer's window, missing => path, dir => path}.
sub program {
    my ( $seed, $case, $files ) = @_;
    my $rnd  = new_rng( $seed * 7919 + $case );
    my $ri   = sub { int( $rnd->() * $_[0] ) };
    my $pick = sub { $_[ $ri->( scalar @_ ) ] };
    my $kind = $pick->(qw(http http http sse sse websocket websocket));
    my %p    = ( kind => $kind, steps => [] );
    if ( $kind eq 'http' ) {
        $p{method} = $pick->(qw(GET GET GET POST POST HEAD));
        $p{request_body} = 'b' x $pick->( 1, 100, 5000, 70_000 ) if $p{method} eq 'POST';
    }
    else {
        $p{method} = 'GET';
        $p{offer} = $pick->( undef, 'chat, superchat' ) if $kind eq 'websocket';
    }
    # A probe request pipelined behind the app's (never behind a handshake).
    $p{pipeline} = $kind ne 'websocket' && $rnd->() < 0.5;
    my $g = AppFuzz::Gen->new( $rnd, $files, $kind );
    my $n = 1 + $ri->(7);
    # Most programs start as a sound app would, so that the later, odder
    # steps meet a response in every state.
    push @{ $p{steps} }, $g->opening if $rnd->() < 0.75;
    push @{ $p{steps} }, $g->step for 1 .. $n;
    push @{ $p{steps} }, $g->closing if $rnd->() < 0.6;
    return \%p;
}

# Every header name a program hands the server (lower-cased): the wire may
# carry these and the server's own, nothing else.
sub header_names {
    my ($p) = @_;
    my %names;
    for my $step ( @{ $p->{steps} } ) {
        next unless $step->[0] eq 'send' && ref $step->[1] eq 'HASH';
        my $h = $step->[1]{headers};
        next unless ref $h eq 'ARRAY';
        for my $pair (@$h) {
            next unless ref $pair eq 'ARRAY' && defined $pair->[0] && !ref $pair->[0];
            $names{ lc $pair->[0] } = 1;
        }
    }
    return \%names;
}

# A readable form of a step, for --verbose.
sub describe {
    my ($step) = @_;
    my ( $op, @args ) = @$step;
    return "$op @args" unless $op eq 'send';
    my ( $event, $how ) = @args;
    return "send $how " . show($event);
}

sub show {
    my ($v) = @_;
    return 'undef' unless defined $v;
    if ( ref $v eq 'HASH' ) {
        return '{' . join( ', ', map { "$_ => " . show( $v->{$_} ) } sort keys %$v ) . '}';
    }
    return '[' . join( ', ', map { show($_) } @$v ) . ']' if ref $v eq 'ARRAY';
    return ref($v) if ref $v;
    my $s = length $v > 40 ? substr( $v, 0, 40 ) . '...(' . length($v) . ')' : $v;
    $s =~ s/([^\x20-\x7e])/ord $1 > 255 ? sprintf('\\x{%x}', ord $1) : sprintf('\\x%02x', ord $1)/ge;
    return "'$s'";
}

# ---- acting a program out (in the app) ----------------------------------------

# Run case $case of $seed on this scope.  Returns the Future the server is
# given (it fails when the program dies); $done is called once that Future
# and every Future the program was handed by $send and $receive are ready.
# $waiting (optional) is called with 1 when the program starts to wait on a
# send it awaits that is not yet ready, and with 0 when that send is ready.
sub run {
    my ( $seed, $case, $files, $scope, $receive, $send, $done, $waiting ) = @_;
    require Future;
    require Future::IO;
    my $p    = program( $seed, $case, $files );
    my @made;    # every Future $send and $receive gave the program
    my $f = _act( $p, $receive, $send, \@made, $files, $waiting );
    my $all;
    $all = $f->without_cancel->followed_by(
        sub { Future->wait_all( map { $_->without_cancel } @made ) }
    )->on_ready( sub { undef $all; $done->() } );
    if ( $ENV{APP_FUZZ_TRACE} ) {
        # --verbose: which Futures are still pending 2 s on.
        my $t;
        $t = Future::IO->sleep(2)->on_done(
            sub {
                undef $t;
                warn "app-fuzz case $case: the program is " . _state($f) . '; its Futures: '
                  . join( ', ', map { _state($_) } @made ) . "\n";
            }
        );
    }
    return $f;
}

sub _state {
    my ($f) = @_;
    return 'pending' unless $f->is_ready;
    return 'cancelled' if $f->is_cancelled;
    return $f->is_failed ? 'failed (' . ( $f->failure =~ s/\s+\z//r ) . ')' : 'done';
}

sub _act {
    my ( $p, $receive, $send, $made, $files, $waiting ) = @_;
    my @steps = @{ $p->{steps} };
    my $next;
    # Written without async/await so that this module loads in the fuzzer
    # too; each step returns a Future the next one waits for.
    $next = sub {
        my $step = shift @steps or return Future->done;
        my ( $op, @args ) = @$step;
        my $f;
        if ( $op eq 'send' ) {
            my ( $event, $how ) = @args;
            my $sf = eval { $send->( materialise( $event, $files ) ) };
            $sf = Future->fail("send died: $@") unless $sf;
            push @$made, $sf;
            warn sprintf( "app-fuzz trace: %s -> %s\n", describe($step), _state($sf) ) if $ENV{APP_FUZZ_TRACE} && $ENV{APP_FUZZ_TRACE} > 1;
            if ( $how eq 'await' ) {
                if ( $waiting && !$sf->is_ready ) {
                    $waiting->(1);
                    $sf->on_ready( sub { $waiting->(0) } );
                }
                $f = $sf->else( sub { Future->done } );
            }
            elsif ( $how eq 'cancel' ) { $sf->cancel; $f = Future->done }
            else                       { $f = Future->done }
        }
        elsif ( $op eq 'receive' ) {
            my $rf = $receive->();
            push @$made, $rf;
            $f = $args[0] eq 'await' ? $rf->else( sub { Future->done } ) : Future->done;
        }
        elsif ( $op eq 'sleep' ) { $f = Future::IO->sleep( $args[0] ) }
        elsif ( $op eq 'block' ) { select( undef, undef, undef, $args[0] ); $f = Future->done }
        elsif ( $op eq 'die' )   { return Future->fail("app-fuzz: the program dies\n") }
        elsif ( $op eq 'croak_obj' ) {
            die bless { why => 'an object' }, 'AppFuzz::Error';
        }
        elsif ( $op eq 'return' ) { return Future->done }
        else                      { die "app-fuzz: unknown step $op" }
        return $f->then($next);
    };
    my $f = eval { $next->() } // Future->fail( $@ || 'died' );
    # Break the closure's cycle once the program is over.
    return $f->on_ready( sub { undef $next } );
}

# Events are drawn as data; the few values that cannot be (file handles,
# wide characters made fresh) are made here.
sub materialise {
    my ( $event, $files ) = @_;
    return $event unless ref $event eq 'HASH';
    my %e = %$event;
    if ( exists $e{fh} && !ref $e{fh} ) {
        my $how = $e{fh};
        if ( $how eq 'open' || $how eq 'open big' || $how eq 'closed' ) {
            my $path = $how eq 'open big' ? $files->{big} : $files->{ok};
            open my $fh, '<', $path or die "app-fuzz: $path: $!";
            close $fh if $how eq 'closed';
            $e{fh} = $fh;
        }
    }
    return \%e;
}

# ---- the generator -------------------------------------------------------------

package AppFuzz::Gen;

sub new {
    my ( $class, $rnd, $files, $kind ) = @_;
    return bless { rnd => $rnd, files => $files, kind => $kind }, $class;
}

sub r    { $_[0]{rnd}->() }
sub ri   { int( $_[0]{rnd}->() * $_[1] ) }
sub pick { my $s = shift; $_[ $s->ri( scalar @_ ) ] }
sub how  { $_[0]->pick(qw(await await await await nowait cancel)) }

sub opening {
    my ($s) = @_;
    my $k = $s->{kind};
    if ( $k eq 'http' ) {
        # Sound, mostly a 200; now and then a status that carries no body,
        # or trailers promised without a Trailer header (the server then
        # holds the head back): both states have hidden hangs before.
        my %e = (
            type    => 'http.response.start',
            status  => $s->pick( 200, 200, 200, 200, 204, 304 ),
            headers => [ [ 'content-type', 'text/plain' ] ],
        );
        $e{trailers} = 1 if $s->r < 0.2;
        return [ 'send', \%e, 'await' ];
    }
    return [ 'send', { type => 'sse.start', status => 200 }, 'await' ] if $k eq 'sse';
    return [ 'receive', 'await' ], if $k eq 'websocket' && $s->r < 0.5;
    return [ 'send', { type => 'websocket.accept' }, 'await' ];
}

sub closing {
    my ($s) = @_;
    my $k = $s->{kind};
    return [ 'send', { type => 'http.response.body', body => 'end' }, 'await' ] if $k eq 'http';
    return [ 'send', { type => 'sse.close' }, 'await' ] if $k eq 'sse';
    return [ 'send', { type => 'websocket.close', code => 1000 }, 'await' ];
}

sub step {
    my ($s) = @_;
    my $x = $s->r;
    return [ 'receive', $s->pick(qw(await nowait)) ] if $x < 0.12;
    return [ 'sleep', $s->pick( 0.001, 0.01, 0.05 ) ] if $x < 0.17;
    return [ 'block', 0.005 ] if $x < 0.19;
    return [ $s->pick(qw(die die croak_obj return)) ] if $x < 0.23;
    return [ 'send', $s->odd_event, $s->how ] if $x < 0.30;
    my $k = $s->{kind};
    # Now and then an event of another kind's protocol.
    $k = $s->pick(qw(http sse websocket)) if $s->r < 0.1;
    my $ev = $k eq 'http' ? $s->http_event : $k eq 'sse' ? $s->sse_event : $s->ws_event;
    return [ 'send', $ev, $s->how ];
}

# Not an event at all, or one without a type the spec knows.
sub odd_event {
    my ($s) = @_;
    return $s->pick(
        undef, 'http.response.start', [], {}, { type => undef }, { type => 'http.response.nope' },
        { type => [] }, { type => 'lifespan.startup.complete' }, { type => 'http.fullflush' },
        { type => 'http.request' }, { type => "http.response.body\0" },
    );
}

sub status {
    my ($s) = @_;
    # 204 and 304 twice: hyper writes no body for them, and what the
    # exchange then does with queued bytes and waiting sends found bugs.
    return $s->pick( 200, 200, 200, 201, 204, 204, 304, 304, 404, 500, 101, 100, 103, 199, 99, 600, 1000, -1, 0, 'abc',
        '200 OK', 200.5, '201.0', undef, [], "20\x{663}" );
}

# A header list, mostly sound.
sub headers {
    my ( $s, $n ) = @_;
    my $r = $s->r;
    return $s->pick( 'not a list', {}, [ 'content-type', 'text/plain' ], undef ) if $r < 0.06;
    my @h;
    for ( 1 .. ( $n // $s->ri(4) ) ) {
        push @h, $s->header;
    }
    return \@h;
}

sub header {
    my ($s) = @_;
    my $inj = $AppFuzz::INJECTED;
    my $x   = $s->r;
    return [ 'x-fuzz', $s->pick( 'a', 'b c', '', "\t", 'a' x 9000 ) ] if $x < 0.35;
    return [ $s->pick( 'Content-Type', 'cache-control', 'Set-Cookie', 'X-Up' ), 'v' ] if $x < 0.5;
    return $s->pick(
        [ 'x-fuzz', "a\r\n$inj: 1" ], [ 'x-fuzz', "a\n$inj: 1" ], [ 'x-fuzz', "a\r$inj: 1" ],
        [ "x-fuzz\r\n$inj", 'v' ], [ "x-fuzz: a\r\n$inj", 'v' ], [ "$inj fuzz", 'v' ], [ "$inj:", 'v' ],
        [ '', 'v' ], [ 'x-fuzz', "nul\0nul" ], [ 'x-fuzz', "\x{263a}" ], [ "x-\x{263a}", 'v' ],
        [ 'x-fuzz', "caf\xe9" ], [ 'x-fuzz', undef ], [ undef, 'v' ], [ 'x-fuzz' ], [ 'x-fuzz', 'a', 'b' ],
        [ 'x-fuzz', {} ], [ [], 'v' ], 'x-fuzz', undef, [ 'x-fuzz', " padded " ], [ 'x-fuzz', 12 ],
    ) if $x < 0.8;
    # Framing headers: the server owns these.
    return $s->pick(
        [ 'content-length', $s->pick( 0, 3, 5, 100, 1_000_000, -1, 'abc', '3 ', ' 3', '0x3', '3,3', '' ) ],
        [ 'transfer-encoding', $s->pick( 'chunked', 'gzip', 'identity' ) ],
        [ 'connection', $s->pick( 'close', 'keep-alive', 'upgrade' ) ],
        [ 'upgrade', 'h2c' ], [ 'keep-alive', 'timeout=5' ], [ 'date', 'yesterday' ], [ 'trailer', 'x-t' ],
        [ 'te', 'trailers' ], [ 'proxy-connection', 'x' ], [ 'sec-websocket-accept', 'x' ],
    );
}

sub body_bytes {
    my ($s) = @_;
    return $s->pick(
        '', 'x', 'hello', 'y' x 3, 'z' x 5000, 'w' x 70_000, 'v' x 300_000, "\x{263a}wide", "caf\xe9",
        undef, [], \'ref', "HTTP/1.1 200 OK\r\n$AppFuzz::INJECTED: 1\r\n\r\n",
    );
}

sub more { $_[0]->pick( 1, 1, 0, 0, undef, 'yes', [] ) }

sub http_event {
    my ($s) = @_;
    my $x = $s->r;
    my $f = $s->{files};
    if ( $x < 0.22 ) {
        my %e = ( type => 'http.response.start', status => $s->status, headers => $s->headers );
        $e{trailers} = $s->pick( 1, 0, 'yes' ) if $s->r < 0.2;
        delete $e{headers} if $s->r < 0.05;
        return \%e;
    }
    if ( $x < 0.62 ) {
        my %e = ( type => 'http.response.body', body => $s->body_bytes );
        $e{more} = $s->more if $s->r < 0.7;
        delete $e{body} if $s->r < 0.05;
        return \%e;
    }
    if ( $x < 0.77 ) {
        my %e = ( type => 'http.response.body' );
        if ( $s->r < 0.6 ) { $e{file} = $s->pick( $f->{ok}, $f->{big}, $f->{missing}, $f->{dir}, '', [] ) }
        else               { $e{fh}   = $s->pick( 'open', 'open big', 'closed', 'not a handle', [] ) }
        $e{offset} = $s->pick( 0, 5, 99_999, 100_000, 1_000_000, -1, 'abc' ) if $s->r < 0.4;
        $e{length} = $s->pick( 0, 3, 50_000, 1_000_000, -1, undef, 'abc' ) if $s->r < 0.4;
        $e{more}   = $s->more if $s->r < 0.5;
        $e{body}   = 'both' if $s->r < 0.05;
        return \%e;
    }
    if ( $x < 0.9 ) {
        my $h = $s->headers( 1 + $s->ri(2) );
        push @$h, [ $s->pick( 'x-t', 'content-length', 'transfer-encoding', 'x-t' ), 'v' ] if ref $h eq 'ARRAY';
        my %e = ( type => 'http.response.trailers', headers => $h );
        $e{more} = $s->more if $s->r < 0.3;
        return \%e;
    }
    return { type => 'http.fullflush' };
}

sub sse_event {
    my ($s) = @_;
    my $inj = "injected";
    my $x   = $s->r;
    return { type => 'sse.start', status => $s->pick( 200, 200, 204, 404, 99, 'x', undef, 200.5, '201.0' ), headers => $s->headers }
      if $x < 0.12;
    if ( $x < 0.6 ) {
        my %e = ( type => 'sse.send' );
        $e{data} = $s->pick( 'tick', "two\nlines", "cr\rline", "crlf\r\nline", '', "\x{263a}", "\nevent: $inj",
            "\r\nid: $inj", 'big' x 30_000, undef, [] );
        $e{event} = $s->pick( 'tick', "a\nevent: $inj", "a\revent: $inj", '', "\x{263a}", [] ) if $s->r < 0.4;
        $e{id}    = $s->pick( '1', "1\nid: $inj", "nul\0id", '', "\x{263a}", 42 ) if $s->r < 0.3;
        $e{retry} = $s->pick( 1000, 0, -1, 'abc', "5\nretry: 7777", 1.5, 2**70 ) if $s->r < 0.3;
        delete $e{data} if $s->r < 0.05;
        return \%e;
    }
    if ( $x < 0.72 ) {
        return { type => 'sse.comment', comment => $s->pick( 'ping', "two\nlines", "x\revent: $inj", '', undef, [] ) };
    }
    if ( $x < 0.8 ) {
        my %e = ( type => 'sse.keepalive', interval => $s->pick( 0, 1, 10, 1000, -5, 'abc', undef ) );
        $e{comment} = $s->pick( 'ka', "x\nevent: $inj" ) if $s->r < 0.5;
        return \%e;
    }
    if ( $x < 0.86 ) { return { type => 'sse.close' } }
    if ( $x < 0.92 ) {
        return { type => $s->pick( 'http.response.start', 'sse.http.response.start' ), status => $s->status,
            headers => $s->headers };
    }
    return { type => $s->pick( 'http.response.body', 'sse.http.response.body' ), body => $s->body_bytes,
        more => $s->more };
}

sub ws_event {
    my ($s) = @_;
    my $x = $s->r;
    if ( $x < 0.15 ) {
        my %e = ( type => 'websocket.accept' );
        $e{subprotocol} = $s->pick( 'chat', 'bogus', '', "a\r\nb", [] ) if $s->r < 0.4;
        $e{headers} = $s->headers if $s->r < 0.4;
        return \%e;
    }
    if ( $x < 0.6 ) {
        my %e = ( type => 'websocket.send' );
        my $y = $s->r;
        if    ( $y < 0.45 ) { $e{text}  = $s->pick( 'hi', "\x{263a}", "caf\xe9", '', 't' x 70_000, undef, [] ) }
        elsif ( $y < 0.85 ) { $e{bytes} = $s->pick( "\x00\xff", '', 'b' x 200_000, "\x{263a}", undef ) }
        elsif ( $y < 0.93 ) { $e{text}  = 'both'; $e{bytes} = 'both' }
        return \%e;
    }
    if ( $x < 0.75 ) {
        my %e = ( type => 'websocket.close' );
        $e{code} = $s->pick( 1000, 1001, 1011, 3000, 4999, 999, 1004, 1005, 1006, 1015, 5000, 0, -1, 'abc', undef )
          if $s->r < 0.7;
        $e{reason} = $s->pick( 'bye', 'r' x 123, 'r' x 124, "\x{263a}" x 41, "\x{263a}" x 42, '', undef, [] )
          if $s->r < 0.5;
        return \%e;
    }
    if ( $x < 0.82 ) {
        return { type => 'websocket.keepalive', interval => $s->pick( 0, 1, 1000, -1, 'abc', undef ) };
    }
    if ( $x < 0.92 ) {
        return { type => $s->pick( 'websocket.http.response.start', 'http.response.start' ),
            status => $s->status, headers => $s->headers };
    }
    return { type => $s->pick( 'websocket.http.response.body', 'http.response.body' ), body => $s->body_bytes,
        more => $s->more };
}

1;
