package PAGI::RS::Lifespan;

# The lifespan protocol (Spec/Lifespan.pod) for one interpreter: startup
# before the server accepts connections, shutdown after it has drained.

use strict;
use warnings;
use Future;
use Scalar::Util qw(blessed);
use PAGI::RS::Pending;

# Event kinds for PAGI::RS::_lifespan_event (lifespan_kind in interp/mod.rs).
use PAGI::RS::Constants qw(lifespan log);

my ( @queue, $waiting, $startup_answered, $shutdown_answered, $app_future, $ended );

# A receive made while another waits gets the event after that one's
# (PAGI::RS::Pending::after), instead of taking over the wait and leaving
# the earlier one pending for ever.
sub _receive {
    return Future->done( shift @queue ) if @queue;
    return PAGI::RS::Pending::after( $waiting, \&_receive ) if $waiting && !$waiting->is_ready;
    return $waiting = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
}

sub _send {
    my ($ev) = @_;
    my $type = ref $ev eq 'HASH' ? $ev->{type} // '' : '';
    if ( $type eq 'lifespan.startup.complete' ) {
        $startup_answered = 1;
        PAGI::RS::_lifespan_event( STARTUP_COMPLETE, '' );
    }
    elsif ( $type eq 'lifespan.startup.failed' ) {
        $startup_answered = 1;
        PAGI::RS::_lifespan_event( STARTUP_FAILED, $ev->{message} // '' );
    }
    elsif ( $type eq 'lifespan.shutdown.complete' ) {
        $shutdown_answered = 1;
        PAGI::RS::_lifespan_event( SHUTDOWN_COMPLETE, '' );
    }
    elsif ( $type eq 'lifespan.shutdown.failed' ) {
        $shutdown_answered = 1;
        PAGI::RS::_lifespan_event( SHUTDOWN_FAILED, $ev->{message} // '' );
    }
    else {
        return Future->fail("Unrecognised event type '$type' for a lifespan scope\n");
    }
    return Future->done;
}

# The scope's pagi hash: the core version the server speaks (lifespan's own
# sub-spec is 0.3 in both), and, as the reference server gives it, whether
# this is a worker process and its number (undef in a single process), for
# an app that runs a task in one worker only.
sub startup {
    my ($worker) = @_;
    @queue = ( { type => 'lifespan.startup' } );
    my $scope = {
        type => 'lifespan',
        pagi => {
            version      => $PAGI::RS::Bridge::CORE_VERSION,
            spec_version => '0.3',
            is_worker    => $worker ? 1 : 0,
            worker_num   => $worker || undef,
        },
        state => \%PAGI::RS::Bridge::STATE,
    };
    my $f = eval { $PAGI::RS::Bridge::APP->( $scope, \&_receive, \&_send ) };
    if ( !defined $f ) {
        _ended( $@ eq '' ? undef : $@ );
    }
    elsif ( blessed($f) && $f->isa('Future') ) {
        $app_future = $f;
        $f->on_ready(
            sub {
                my $done = shift;
                $app_future = undef;
                _ended( $done->is_failed ? ( $done->failure )[0] // 'lifespan failed' : undef );
            }
        );
    }
    else {
        _ended(undef);
    }
    return;
}

# The lifespan coroutine finished: before answering startup it declined the
# protocol; afterwards it ended (an error then is logged, the server runs on).
sub _ended {
    my ($err) = @_;
    return if $ended++;
    if ( !$startup_answered ) {
        PAGI::RS::_lifespan_event( DECLINED_STARTUP, $err // '' );
        return;
    }
    PAGI::RS::_log( LOG_ERROR, "PAGI lifespan application error: $err" ) if defined $err;
    PAGI::RS::_lifespan_event( ENDED, $err // '' ) unless $shutdown_answered;
    return;
}

sub shutdown {
    my $ev = { type => 'lifespan.shutdown' };
    if ( $ended ) {
        PAGI::RS::_lifespan_event( ENDED, '' ) unless $shutdown_answered;
        return;
    }
    if ( $waiting && !$waiting->is_ready ) {
        my $w = $waiting;
        $waiting = undef;
        $w->done($ev);
    }
    else {
        push @queue, $ev;
    }
    return;
}

1;
