#!/usr/bin/perl
# PAGI::RS::Pending (perl/PAGI/RS/Pending.pm): the pending Futures handed to
# applications answer Future::AsyncAwait's questions directly.  Whatever
# the shortcuts, an await on one must behave as on a plain IO::Async::Future:
# resume with the result, rethrow a failure, propagate cancellation, work
# with ->get and ->then, and honour a wrap_cb someone installed.
use strict;
use warnings;
use FindBin qw($Bin);
use lib "$Bin/../perl";
use Test::More;
use Future;
use Future::AsyncAwait;
use IO::Async::Loop;
use PAGI::RS::Pending;

# A shortcut that lost a callback would leave ->get waiting for ever
# (t/16, running this inside pagi-rs, has its own deadline).
if ( !defined &PAGI::RS::Pending::_c_new ) {
    $SIG{ALRM} = sub { die "timed out: an await was never resumed\n" };
    alarm 30;
}

my $loop = IO::Async::Loop->new;

# The shortcuts are on with Debian's Future (pure Perl); elsewhere setup
# must say no rather than guess.
my $lean = PAGI::RS::Pending->setup($loop);
if ( Future->new->isa('Future::PP') && !Future::PP::DEBUG() ) {
    ok( $lean, 'setup: the installed Future has the layout the shortcuts read' );
    # Inside pagi-rs (t/16 runs this file there) they are C: pending.c.
    if ( defined &PAGI::RS::Pending::_c_new ) {
        is( \&PAGI::RS::Pending::AWAIT_IS_READY, \&PAGI::RS::Pending::_c_is_ready, 'the shortcuts are installed, in C' );
        is( \&PAGI::RS::Pending::done, \&PAGI::RS::Pending::_c_done, 'done is C too' );
    }
    else {
        is( \&PAGI::RS::Pending::AWAIT_IS_READY, \&PAGI::RS::Pending::_lean_is_ready, 'the shortcuts are installed' );
    }
}
else {
    ok( !$lean, 'setup: not the pure-Perl Future, so no shortcuts' );
}

my $f = PAGI::RS::Pending->new($loop);
isa_ok( $f, 'IO::Async::Future' );
is( $f->loop, $loop, 'it knows its loop, as IO::Async::Future->new($loop) does' );
ok( !$f->is_ready, 'pending when made' );

# Resumes with the result, in scalar and list context.
{
    my $p = PAGI::RS::Pending->new($loop);
    my $app = ( async sub { my $v = await $p; return "got $v" } )->();
    ok( !$app->is_ready, 'the async sub waits' );
    isa_ok( $app, 'PAGI::RS::Pending', "the async sub's own Future (AWAIT_CLONE)" );
    $p->done('x');
    is( $app->get, 'got x', 'resumed with the result' );

    my $q    = PAGI::RS::Pending->new($loop);
    my $list = ( async sub { my @v = await $q; return scalar @v } )->();
    $q->done( 1, 2, 3 );
    is( $list->get, 3, 'list context gets every value' );
}

# A failure is rethrown at the await.
{
    my $p   = PAGI::RS::Pending->new($loop);
    my $app = ( async sub { my $ok = eval { await $p; 1 }; return $ok ? 'no error' : "caught: $@" } )->();
    $p->fail("boom\n");
    is( $app->get, "caught: boom\n", 'failure rethrown inside the async sub' );
}

# Cancelling the async sub's Future cancels the Future it waits on.
{
    my $p   = PAGI::RS::Pending->new($loop);
    my $app = ( async sub { await $p; return 'finished' } )->();
    $app->cancel;
    ok( $p->is_cancelled, 'cancel reached the awaited Future' );
}

# Cancellation after several awaits, with callbacks registered in between:
# the same things are cancelled, in the same order, as with plain
# IO::Async::Futures; Futures awaited earlier and done are left alone.
{
    my $scenario = sub {
        my ($make) = @_;
        my ( @order, @waits );
        my $gate = $make->();
        my $app  = ( async sub {
            await $gate;
            for my $i ( 1 .. 3 ) {
                my $p = $make->();
                push @waits, $p;
                await $p;
            }
            return 'finished';
        } )->();
        $app->on_cancel( sub { push @order, 'first callback' } );
        $gate->done;
        $waits[0]->done;
        $app->on_cancel( sub { push @order, 'second callback' } );
        $waits[1]->on_cancel( sub { push @order, 'awaited' } );
        $app->cancel;
        return {
            order          => \@order,
            awaits         => scalar @waits,
            first_done     => $waits[0]->is_done && !$waits[0]->is_cancelled ? 1 : 0,
            last_cancelled => $waits[1]->is_cancelled ? 1 : 0,
        };
    };
    my $ours  = $scenario->( sub { PAGI::RS::Pending->new($loop) } );
    my $plain = $scenario->( sub { IO::Async::Future->new($loop) } );
    is( $ours->{last_cancelled}, 1, 'the Future awaited at the time was cancelled' );
    is( $ours->{first_done},     1, 'one awaited before and done stays done' );
    is( $ours->{awaits},         2, 'the async sub did not go on' );
    is_deeply( $ours, $plain, 'the same outcome and order as plain IO::Async::Futures' )
      or diag explain [ $ours, $plain ];
}

# done and on_ready, which take a shortcut when every callback is a plain
# on_ready one: what runs, in what order, with what, is what plain
# IO::Async::Futures do, whatever else is registered (->then chains, a
# Future as callback, on_done) and however the Future ended.
{
    my $scenario = sub {
        my ($make) = @_;
        my @log;
        my $note = sub { my ($what) = @_; sub { push @log, "$what:" . ( $_[0]->is_done ? join( ',', $_[0]->result ) : $_[0]->state ) } };

        my $plain = $make->();
        my $same  = $plain->on_ready( $note->('first') );
        push @log, 'on_ready returns the Future' if $same == $plain;
        $plain->on_ready(
            sub { push @log, 'second'; $_[0]->on_ready( $note->('added while settling') ); push @log, 'after adding' } );
        $plain->done( 'a', 'b' );
        $plain->on_ready( $note->('added after') );
        push @log, 'done twice: ' . ( eval { $plain->done('again'); 1 } ? 'allowed' : 'croaks' );

        my $mixed = $make->();
        $mixed->on_ready( $note->('mixed ready') );
        $mixed->on_done( sub { push @log, "on_done: @_" } );
        my $follower = Future->new;
        $mixed->on_ready($follower);
        $mixed->done(7);
        push @log, 'follower: ' . join( ',', $follower->result );

        my $chained = $make->();
        $chained->on_ready( $note->('chained ready') );
        my $then = $chained->then( sub { Future->done("then @_") } );
        $chained->done(8);
        push @log, 'then: ' . $then->result;

        my $cancelled = $make->();
        $cancelled->on_ready( $note->('cancelled') );
        $cancelled->cancel;
        push @log, 'done after cancel: ' . ( $cancelled->done(1) == $cancelled ? 'ignored' : 'other' );

        my $failed = $make->();
        $failed->on_ready( $note->('failed') );
        $failed->fail("no\n");
        push @log, 'failure: ' . $failed->failure;

        my $awaited = $make->();
        my $app     = ( async sub { my @v = await $awaited; return "resumed @v" } )->();
        $awaited->on_ready( $note->('beside the await') );
        $awaited->done( 1, 2 );
        push @log, $app->get;
        return \@log;
    };
    my $ours  = $scenario->( sub { PAGI::RS::Pending->new($loop) } );
    my $plain = $scenario->( sub { IO::Async::Future->new($loop) } );
    is_deeply( $ours, $plain, 'done and on_ready: the same callbacks, order and results as plain IO::Async::Futures' )
      or diag explain [ $ours, $plain ];
    is( scalar @$ours, 18, 'every step of the scenario ran' ) or diag explain $ours;
}

# Many awaits in one async sub (a WebSocket's receive loop).
{
    my @waits;
    my $app = ( async sub {
        my $sum = 0;
        for my $i ( 1 .. 50 ) {
            my $p = PAGI::RS::Pending->new($loop);
            push @waits, $p;
            $sum += await $p;
        }
        return $sum;
    } )->();
    my $n = 0;
    while ( my $p = shift @waits ) { $p->done( ++$n ) }
    is( $app->get, 1275, '50 successive awaits each resumed with their value' );
}

# ->get runs the loop until something settles it; ->then chains.
{
    my $p = PAGI::RS::Pending->new($loop);
    $loop->watch_time( after => 0.01, code => sub { $p->done(42) } );
    my $chained = $p->then( sub { Future->done( $_[0] + 1 ) } );
    is( $p->get,       42, '->get waits on the loop' );
    is( $chained->get, 43, '->then chains' );
}

# A wrap_cb someone installed is honoured by await.
{
    my $wrapped = 0;
    my $orig    = \&Future::wrap_cb;
    {
        no warnings 'redefine';
        local *Future::wrap_cb = sub {
            my ( $self, $op, $cb ) = @_;
            $wrapped++;
            return $cb;
        };
        my $p   = PAGI::RS::Pending->new($loop);
        my $app = ( async sub { return await $p } )->();
        $p->done('w');
        is( $app->get, 'w', 'await still resumes with wrap_cb replaced' );
    }
    ok( $wrapped >= 1, 'the installed wrap_cb saw the await callback' );
}

# With $Future::TIMES on, a Future is built the ordinary way (it records
# its times).
{
    local $Future::TIMES = 1;
    my $p = PAGI::RS::Pending->new($loop);
    ok( $p->btime, 'Future::TIMES: built by Future itself, with its start time' );
    $p->done(1);
    ok( $p->is_done, 'and it settles' );
}

# The Future of an async sub that finished without waiting
# (Future->AWAIT_NEW_DONE; inside pagi-rs made in C, pending.c) is
# Future's own in every way.
{
    if ( $lean && defined &PAGI::RS::Pending::_c_new ) {
        is( Future->can('AWAIT_NEW_DONE'), \&PAGI::RS::Pending::_c_new_done, 'AWAIT_NEW_DONE is C' );
    }
    my $ref = [1];
    my $x   = 'a';
    my $f   = ( async sub { return ( $x, undef, $ref ) } )->();
    $x = 'changed';
    is( ref $f, 'Future', 'a plain Future' );
    ok( $f->is_done && !$f->is_failed && !$f->is_cancelled, 'done' );
    my @got = $f->get;
    is( scalar @got, 3, 'with every value' );
    is( $got[0], 'a', 'copied when returned' );
    ok( !defined $got[1], 'undef kept' );
    is( $got[2], $ref, 'the same reference' );
    is( scalar $f->get, 'a', 'the first in scalar context' );
    my $none = ( async sub { return } )->();
    ok( $none->is_done, 'nothing returned: still done' );
    is_deeply( [ $none->get ], [], 'with no values' );
    my $seen;
    $f->on_done( sub { $seen = $_[0] } );
    is( $seen, 'a', 'on_done runs at once on it' );
    is( $f->then( sub { Future->done("$_[0]!") } )->get, 'a!', '->then chains from it' );
    my $outer = ( async sub { my ($v) = await( ( async sub { return 'inner' } )->() ); return "$v outer" } )->();
    is( $outer->get, 'inner outer', 'an async sub awaits another that did not wait' );

    {
        package My::Future;
        our @ISA = ('Future');
        our $made = 0;
        sub done { $made++; return shift->SUPER::done(@_) }
    }
    my $mine = My::Future->AWAIT_NEW_DONE(7);
    isa_ok( $mine, 'My::Future', 'a subclass asking' );
    is( $My::Future::made, 1, "gets its own done" );
    is( $mine->get, 7, 'with the value' );

    if ( Future->new->isa('Future::PP') ) {
        local $Future::TIMES = 1;
        my $timed = ( async sub { return 1 } )->();
        ok( $timed->btime, 'Future::TIMES: made by Future itself, with its times' );
    }
}

done_testing;
