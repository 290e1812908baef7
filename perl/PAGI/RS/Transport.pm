package PAGI::RS::Transport;

# The `pagi.transport` interface (Spec/Www.pod, "Transport Flow Control"):
# live outbound figures read from the network core, and edge-triggered
# high-water / drain callbacks.  Like PAGI::RS::Connection, it works on the
# per-request object; its slots ON_HIGH and ON_DRAIN belong to this file,
# and it settles HTTP.pm's SEND_WAIT (the pending send waiting for the
# buffer to drain; SSE.pm and WebSocket.pm share the layout).

use strict;
use warnings;
use PAGI::RS::Constants qw(slot query log);
use Scalar::Util qw(refaddr);

sub buffered_amount { PAGI::RS::_query( $_[0][ID], Q_BUFFERED ) // 0 }
sub high_water_mark { $PAGI::RS::Bridge::HIGH_WATER }
sub low_water_mark  { $PAGI::RS::Bridge::LOW_WATER }

sub on_high_water {
    my ( $self, $cb ) = @_;
    push @{ $self->[ON_HIGH] }, $cb;
    _call($cb) if $self->buffered_amount >= $PAGI::RS::Bridge::HIGH_WATER;
    return;
}

# The core reports drains only when a send waits for one, or when asked:
# a streaming app without callbacks costs no message per crossing.
sub on_drain {
    my ( $self, $cb ) = @_;
    PAGI::RS::_query( $self->[ID], Q_WANT_DRAIN ) unless $self->[ON_DRAIN];
    push @{ $self->[ON_DRAIN] }, $cb;
    return;
}

# The core says the buffer fell below the low mark after reaching the high
# one; $settles_wait: a send waited for this drain (without, the news is
# for on_drain only, and a send that began waiting since is not resolved).
# Callbacks first: resolving the send resumes the app, which may push past
# the high mark again before a late on_drain would run.
sub _on_drained {
    my ( $self, $settles_wait ) = @_;
    $self->_fire_drain if $self->[ON_DRAIN];
    $self->_send_waited if $settles_wait;
    return;
}

# Resolve the send that waits for the drain.  The app holds that Future
# itself (HTTP.pm's _in_flight), so the send slot is freed first: resumed,
# the app's next send takes the fast path.
sub _send_waited {
    my ($self) = @_;
    my $f = $self->[SEND_WAIT] or return;
    $self->[SEND_WAIT] = undef;
    my $busy = $self->[SEND_BUSY];
    $self->[SEND_BUSY] = undef if $busy && refaddr($busy) == refaddr($f);
    $f->done unless $f->is_ready;
    return;
}

sub _fire_high  { _call($_) for @{ $_[0][ON_HIGH]  // [] } }
sub _fire_drain { _call($_) for @{ $_[0][ON_DRAIN] // [] } }

sub _call {
    my ($cb) = @_;
    return if eval { $cb->(); 1 };
    PAGI::RS::_log( LOG_ERROR + LOG_FROM_TRANSPORT_STATE, "transport callback error: $@" );
}

1;
