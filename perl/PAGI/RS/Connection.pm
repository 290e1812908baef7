package PAGI::RS::Connection;

# The `pagi.connection` interface (Spec/Www.pod, "Connection State"):
# per-request, non-destructive disconnect detection and response progress.
#
# The methods work on the per-request object (PAGI::RS::HTTP), which also
# provides pagi.transport: one array per request instead of three objects,
# because every request creates it.  The slots below belong to this file
# (glue.c's $send writes ID/STARTED/COMPLETE by number: keep them in step).

use strict;
use warnings;

use constant {
    ID                => 0,
    CONNECTED         => 1,
    REASON            => 2,
    STARTED           => 3,
    COMPLETE          => 4,
    ON_DISCONNECT     => 5,
    ON_COMPLETE       => 6,
    FUTURE            => 7,
    COMPLETED_CLEANLY => 8,
};

# pagi-rs query code: "tell me how this request ends" (exports.rs).
use constant WANT_TERMINAL => 10;

sub is_connected      { $_[0][CONNECTED] ? 1 : 0 }
sub disconnect_reason { $_[0][REASON] }
sub response_started  { $_[0][STARTED]  ? 1 : 0 }
sub response_complete { $_[0][COMPLETE] ? 1 : 0 }

sub on_disconnect {
    my ( $self, $cb ) = @_;
    if ( defined $self->[REASON] ) {
        _call( 'on_disconnect', $cb, $self->[REASON] );
        return;
    }
    return if $self->[COMPLETED_CLEANLY];
    push @{ $self->[ON_DISCONNECT] }, $cb;
    PAGI::RS::_query( $self->[ID], WANT_TERMINAL );
    return;
}

sub on_complete {
    my ( $self, $cb ) = @_;
    if ( $self->[COMPLETED_CLEANLY] ) {
        _call( 'on_complete', $cb );
        return;
    }
    return if defined $self->[REASON];
    push @{ $self->[ON_COMPLETE] }, $cb;
    PAGI::RS::_query( $self->[ID], WANT_TERMINAL );
    return;
}

sub disconnect_future {
    my ($self) = @_;
    my $f = $self->[FUTURE] //= do {
        my $new = $PAGI::RS::Bridge::LOOP->new_future;
        if ( defined $self->[REASON] ) {
            $new->done( $self->[REASON] );
        }
        else {
            PAGI::RS::_query( $self->[ID], WANT_TERMINAL );
        }
        $new;
    };
    # Each caller gets an observer, so one caller's cancel cannot break another's.
    return $f->without_cancel;
}

# The abnormal end, in the order the spec fixes: is_connected, reason,
# future, callbacks.  (The caller then delivers http.disconnect.)
sub _mark_disconnected {
    my ( $self, $reason ) = @_;
    return 0 if defined $self->[REASON] || $self->[COMPLETED_CLEANLY];
    $self->[CONNECTED] = 0;
    $self->[REASON]    = $reason;
    my $f = $self->[FUTURE];
    $f->done($reason) if $f && !$f->is_ready;
    my $cbs = $self->[ON_DISCONNECT] // [];
    $self->[ON_DISCONNECT] = $self->[ON_COMPLETE] = undef;
    _call( 'on_disconnect', $_, $reason ) for @$cbs;
    return 1;
}

sub _mark_complete {
    my ($self) = @_;
    return if defined $self->[REASON] || $self->[COMPLETED_CLEANLY];
    $self->[COMPLETED_CLEANLY] = 1;
    my $cbs = $self->[ON_COMPLETE] // [];
    $self->[ON_COMPLETE] = $self->[ON_DISCONNECT] = undef;
    _call( 'on_complete', $_ ) for @$cbs;
    return;
}

# Does anyone wait to hear how this request ends?
# No more events are needed for this request: leave the registry Bridge.pm
# routes the core's messages through, and let the core forget it too.
sub _forget {
    my ($self) = @_;
    delete $PAGI::RS::Bridge::REQUESTS{ $self->[ID] };
    PAGI::RS::_release( $self->[ID] );
    return;
}

sub _has_callbacks {
    my ($self) = @_;
    return ( $self->[ON_COMPLETE] && @{ $self->[ON_COMPLETE] } )
      || ( $self->[ON_DISCONNECT] && @{ $self->[ON_DISCONNECT] } )
      || ( $self->[FUTURE] && !$self->[FUTURE]->is_ready );
}

sub _call {
    my ( $what, $cb, @args ) = @_;
    return if eval { $cb->(@args); 1 };
    PAGI::RS::_log( 3, "$what callback error: $@" );
}

1;
