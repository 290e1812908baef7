package PAGI::RS::Transport;

# The `pagi.transport` object: live outbound flow-control figures read from
# the network core, and edge-triggered high-water / drain callbacks
# (Spec/Www.pod, "Transport Flow Control").

use strict;
use warnings;

use constant { ID => 0, ON_HIGH => 1, ON_DRAIN => 2 };
use constant { Q_BUFFERED => 0 };

sub new { bless [ $_[1], undef, undef ], $_[0] }

sub buffered_amount { PAGI::RS::_query( $_[0][ID], Q_BUFFERED ) // 0 }
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
