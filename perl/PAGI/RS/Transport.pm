package PAGI::RS::Transport;

# The `pagi.transport` interface (Spec/Www.pod, "Transport Flow Control"):
# live outbound figures read from the network core, and edge-triggered
# high-water / drain callbacks.  Like PAGI::RS::Connection, it works on the
# per-request object; these slots belong to this file.

use strict;
use warnings;

use constant { ON_HIGH => 9, ON_DRAIN => 10 };
use constant Q_BUFFERED => 0;    # pagi-rs query code (exports.rs)

sub buffered_amount { PAGI::RS::_query( $_[0][0], Q_BUFFERED ) // 0 }
sub high_water_mark { $PAGI::RS::Bridge::HIGH_WATER }
sub low_water_mark  { $PAGI::RS::Bridge::LOW_WATER }

sub on_high_water {
    my ( $self, $cb ) = @_;
    push @{ $self->[ON_HIGH] }, $cb;
    _call($cb) if $self->buffered_amount >= $PAGI::RS::Bridge::HIGH_WATER;
    return;
}

sub on_drain {
    my ( $self, $cb ) = @_;
    push @{ $self->[ON_DRAIN] }, $cb;
    return;
}

sub _fire_high  { _call($_) for @{ $_[0][ON_HIGH]  // [] } }
sub _fire_drain { _call($_) for @{ $_[0][ON_DRAIN] // [] } }

sub _call {
    my ($cb) = @_;
    return if eval { $cb->(); 1 };
    PAGI::RS::_log( 3, "transport callback error: $@" );
}

1;
