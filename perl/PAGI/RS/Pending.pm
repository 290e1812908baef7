package PAGI::RS::Pending;

# The pending Futures the bridge hands the application: a $receive waiting
# for the next event, a $send waiting for the buffer to drain, a
# disconnect_future.  They are IO::Async::Futures (so ->get runs the loop,
# and ->then and friends are Future's own), of a subclass that answers
# Future::AsyncAwait's questions (the AWAIT_* methods) directly from the
# object instead of through Future's general methods: an `await` on a
# pending Future asks five of them, on every WebSocket message and every
# body chunk that waits for a drain.
#
# The shortcuts read the object the way the pure-Perl Future (Future::PP)
# lays it out.  setup() makes sure, once, that the installed Future and
# IO::Async build exactly that layout; where they do not (another Future
# implementation, Future's DEBUG mode, $Future::TIMES), every method here
# is Future's own and nothing is short-cut.  Inside pagi-rs the busiest of
# them (new, done and the AWAIT_* answers) are C (src/interp/c/pending.c),
# which hands whatever it does not handle to the Perl versions here;
# t/15 checks these, and t/16 runs t/15 again inside the server.

use strict;
use warnings;
use IO::Async::Future;
use Scalar::Util qw(refaddr weaken);

our @ISA = ('IO::Async::Future');

my $LEAN;          # the layout was checked and matches
my $CB_READY;      # Future::PP's flags for an on_ready callback
my $PLAIN_WRAP;    # Future::wrap_cb as installed: unchanged, it is a no-op
my $CANCEL_AWAITED = refaddr( \&_cancel_awaited );  # its on_cancel entry
our ( $C_CB_READY, $C_PLAIN_WRAP );                  # for pending.c

# Check the layout against a Future built the ordinary way, and install
# the shortcuts if it matches.  Returns whether they are on.
sub setup {
    my ( $class, $loop ) = @_;
    return $LEAN if defined $LEAN;
    $LEAN = 0;
    my $plain = IO::Async::Future->new($loop);
    return 0 unless $plain->isa('Future::PP') && !Future::PP::DEBUG();
    return 0 unless defined &Future::PP::CB_ALWAYS && defined &Future::PP::CB_SELF;
    my $lean = _build($loop);
    my $same = join( ',', map { "$_=" . ( ref $plain->{$_} || $plain->{$_} ) } sort keys %$plain ) eq
      join( ',', map { "$_=" . ( ref $lean->{$_} || $lean->{$_} ) } sort keys %$lean );
    return 0 unless $same && $plain->{u_loop} && $plain->{u_loop} == $loop;
    $CB_READY   = Future::PP::CB_ALWAYS() | Future::PP::CB_SELF();
    $PLAIN_WRAP = \&Future::wrap_cb;
    no warnings 'redefine';
    *AWAIT_IS_READY     = \&_lean_is_ready;
    *AWAIT_IS_CANCELLED = \&_lean_is_cancelled;
    *AWAIT_ON_READY     = \&_lean_on_ready;
    *AWAIT_GET          = \&_lean_get;
    *AWAIT_CHAIN_CANCEL = \&_lean_chain_cancel;
    # Inside pagi-rs, the busiest methods in C (src/interp/c/pending.c);
    # the Perl ones stay, as what the C versions hand unusual cases to.
    # They read $C_CB_READY, $C_PLAIN_WRAP and the _perl_* names.
    if ( defined &_c_new ) {
        ( $C_CB_READY, $C_PLAIN_WRAP ) = ( $CB_READY, $PLAIN_WRAP );
        *_perl_new          = \&new;
        *_perl_clone        = \&AWAIT_CLONE;
        *_perl_done         = \&done;
        *new                = \&_c_new;
        *AWAIT_CLONE        = \&_c_clone;
        *done               = \&_c_done;
        *AWAIT_IS_READY     = \&_c_is_ready;
        *AWAIT_IS_CANCELLED = \&_c_is_cancelled;
        *AWAIT_ON_READY     = \&_c_on_ready;
        *AWAIT_GET          = \&_c_get;
        *AWAIT_CHAIN_CANCEL = \&_c_chain_cancel;
        _install_new_done();
    }
    return $LEAN = 1;
}

# Future->AWAIT_NEW_DONE in C too (pending.c): the Future of every async
# sub call that finished without waiting.  Installed in package Future,
# in front of the one Future inherits, unless something already put one
# there; the C version hands every other case to the inherited one.  It
# must build exactly what the inherited one builds, or it stays out.
sub _install_new_done {
    my $inherited = Future->can('AWAIT_NEW_DONE');
    return 0 if !$inherited || defined &Future::AWAIT_NEW_DONE;
    *_perl_new_done = $inherited;
    my @args = ( 'a', undef, [1] );
    my ( $c, $perl ) = ( _c_new_done( 'Future', @args ), $inherited->( 'Future', @args ) );
    my $layout = sub {
        my ($f) = @_;
        return join ',', ref $f, map { "$_=" . ( ref $f->{$_} || $f->{$_} ) } sort keys %$f;
    };
    return 0
      unless $layout->($c) eq $layout->($perl)
      && join( '|', map { $_ // 'undef' } @{ $c->{result} } ) eq join( '|', map { $_ // 'undef' } @{ $perl->{result} } )
      && $c->{result}[2] == $perl->{result}[2]
      && !@{ $c->{callbacks} };
    no warnings 'once';
    *Future::AWAIT_NEW_DONE = \&_c_new_done;
    return 1;
}

sub _build { return bless { ready => 0, callbacks => [], u_loop => $_[0] }, __PACKAGE__ }

# A new pending Future on $loop.
sub new {
    my ( $class, $loop ) = @_;
    return _build($loop) if $LEAN && !$Future::TIMES && !ref $class;
    return $class->SUPER::new( ref $class ? () : $loop );
}

# The async sub's own Future, made from the first one it waits on.
sub AWAIT_CLONE {
    my ($self) = @_;
    return $LEAN && !$Future::TIMES ? _build( $self->{u_loop} ) : $self->new;
}

# The shortcuts setup() installs as AWAIT_IS_READY, AWAIT_IS_CANCELLED,
# AWAIT_ON_READY and AWAIT_GET (otherwise Future's own answer).
sub _lean_is_ready     { return $_[0]{ready} }
sub _lean_is_cancelled { return $_[0]{cancelled} }

sub _lean_on_ready {
    my ( $self, $code ) = @_;
    # Someone installed a wrap_cb (a context-carrying module): honour it.
    $code = $self->wrap_cb( on_ready => $code ) if \&Future::wrap_cb != $PLAIN_WRAP;
    push @{ $self->{callbacks} }, [ $CB_READY, $code ];
    return;
}

# Called on the async sub's own Future with the one it now waits on, so
# that cancelling the first cancels the second.  Future pushes each awaited
# Future onto on_cancel and revokes the entry when it is ready (a
# WebSocket's receive loop churns that list for ever); here one entry
# stands for "whatever is awaited now", kept last in on_cancel as Future's
# newest entry would be, so cancellation runs in the same order.
sub _lean_chain_cancel {
    my ( $self, $awaited ) = @_;
    $self->{u_pagi_rs_awaiting} = $awaited;
    weaken( $self->{u_pagi_rs_awaiting} );
    my $on_cancel = $self->{on_cancel} //= [];
    return if @$on_cancel && ( refaddr( $on_cancel->[-1] ) // 0 ) == $CANCEL_AWAITED;
    # Something was registered since: blank the old entry in place (other
    # Futures hold references to the list's elements) and go last again.
    for (@$on_cancel) {
        $_ = undef if ( refaddr($_) // 0 ) == $CANCEL_AWAITED;
    }
    push @$on_cancel, \&_cancel_awaited;
    return;
}

# Settling and waiting, as the bridge does them on every drain wait and
# every WebSocket receive: when every callback is a plain on_ready one
# (what an awaiting async sub and the bridge register), done runs them
# directly instead of through Future's general dispatch; anything else
# (a ->then chain, a Future as callback, $Future::TIMES) is Future's own.
sub done {
    my $self = shift;
    return $self->SUPER::done(@_)
      unless $LEAN && ref $self && !$Future::TIMES && !$self->{ready} && !$self->{subs} && !$self->{revoke_when_ready};
    my $callbacks = $self->{callbacks};
    for (@$callbacks) {
        return $self->SUPER::done(@_) if $_->[0] != $CB_READY || ref $_->[1] ne 'CODE';
    }
    $self->{result} = [@_];
    $self->{ready}  = 1;
    delete $self->{on_cancel};
    delete $self->{callbacks};
    $_->[1]->($self) for @$callbacks;
    return $self;
}

sub on_ready {
    my ( $self, $code ) = @_;
    return $self->SUPER::on_ready($code)
      unless $LEAN && !$self->{ready} && ref $code eq 'CODE' && \&Future::wrap_cb == $PLAIN_WRAP;
    push @{ $self->{callbacks} }, [ $CB_READY, $code ];
    return $self;
}

sub _cancel_awaited {
    my $awaited = $_[0]{u_pagi_rs_awaiting};
    $awaited->cancel if $awaited && !$awaited->is_ready;
    return;
}

sub _lean_get {
    my ($self) = @_;
    return $self->result if !$self->{ready} || $self->{failure} || $self->{cancelled};
    return wantarray ? @{ $self->{result} } : $self->{result}[0];
}

# A receive made while an earlier one of the same scope still waits (the
# scopes' _receive): a pending Future of its own that, once $earlier has
# settled (done, failed or cancelled by the app), calls $start for its own
# receive and settles as that does.  The events so reach the callers in the
# order they called.  Cancelling it cancels the receive $start made, whose
# event then stays queued for the next receive.
sub after {
    my ( $earlier, $start ) = @_;
    my $next = __PACKAGE__->new($PAGI::RS::Bridge::LOOP);
    my $own;
    $earlier->on_ready(
        sub {
            return if $next->is_ready;
            $own = $start->();
            $own->on_ready($next);
        }
    );
    $next->on_cancel( sub { $own->cancel if $own && !$own->is_ready } );
    return $next;
}

1;
