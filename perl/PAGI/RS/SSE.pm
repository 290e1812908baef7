package PAGI::RS::SSE;

# An sse scope (Spec/Www.pod, "Server-Sent Events"): an HTTP request whose
# response is an event stream.  It is an HTTP request object underneath:
# the body, backpressure, disconnects and pagi.connection work the same.
# This file maps the sse.* events onto it and enforces their order; the
# wire format is built in Rust (src/sse.rs).

use strict;
use warnings;
use Future;
use PAGI::RS::HTTP;

our @ISA = ('PAGI::RS::HTTP');

# HTTP.pm's slots and send codes; this file's slots, STREAM (where the
# stream is in its life: NOT_STARTED to DECLINE_COMPLETE; DECLINING is a
# refusal with an HTTP response, 0.3: sse.http.response.start) and
# EARLY_KEEPALIVE (Www 0.3: an sse.keepalive sent before sse.start, applied
# when it starts).  fast_send.c reads STREAM.
use PAGI::RS::Constants qw(slot send sse_slot sse_stream);

my $DONE = $PAGI::RS::HTTP::DONE;

# $send is send.c's XS sender: it takes a plain sse.send straight to the
# core and hands everything else to _after_send.
sub start {
    my ( $self, $scope, $send ) = @_;
    $self->[STREAM] = NOT_STARTED;
    PAGI::RS::HTTP::run_app( $self, $scope, $send, sub { _receive($self) } );
    return;
}

# The Perl half of $send is HTTP.pm's _after_send; fast_send.c's fast path took
# only a plain sse.send, whose outcome is this.
sub _send_outcome { return PAGI::RS::HTTP::_message_send_outcome( @_, 'sse.send' ) }

sub _send_now { return _send(@_) }

# The http events, renamed: sse.request for the body, sse.disconnect with
# the reason at the end (none after the app's own sse.close).  A refusal
# that completed is an HTTP exchange that ended cleanly: no sse.disconnect
# (Www 0.6), a receive after it hears http.disconnect.
sub _receive {
    my ($self) = @_;
    return PAGI::RS::HTTP::_receive($self)->then(
        sub {
            my ($ev) = @_;
            if ( $ev->{type} eq 'http.request' ) {
                return Future->done( { type => 'sse.request', body => $ev->{body}, more => $ev->{more} } );
            }
            my $state = $self->[STREAM];
            return Future->done($ev)
              if $self->[COMPLETED_CLEANLY] && ( $state == DECLINING || $state == DECLINE_COMPLETE );
            my %end = ( type => 'sse.disconnect' );
            $end{reason} = $self->[REASON] if defined $self->[REASON];
            return Future->done( \%end );
        }
    );
}

sub _fail { return Future->fail("$_[0]\n") }

sub _non_negative_number {
    my ($v) = @_;
    return defined $v && !ref $v && $v =~ /\A(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\z/;
}

sub _send {
    my ( $self, $ev ) = @_;
    my $type = ref $ev eq 'HASH' ? $ev->{type} : undef;
    return _fail("send() needs an event hash reference with a 'type'") unless defined $type;
    my $state = $self->[STREAM];
    my $id    = $self->[ID];

    if ( $type eq 'sse.send' || $type eq 'sse.comment' || $type eq 'sse.keepalive' ) {
        return _fail("cannot send '$type' after sse.close") if $state == STREAM_CLOSED;
        return _fail( "cannot send '$type' after "
              . ( $PAGI::RS::Bridge::CURRENT_SPEC ? 'refusing the stream with an HTTP response' : 'sse.http.response.start' ) )
          if $state == DECLINING || $state == DECLINE_COMPLETE;
        return $self->_early_keepalive($ev)
          if $type eq 'sse.keepalive' && $state == NOT_STARTED && !$PAGI::RS::Bridge::CURRENT_SPEC;
        return _fail("cannot send '$type' before sse.start") if $state != STREAMING;
        my ( $rc, $err );
        if ( $type eq 'sse.send' ) {
            my $data = $ev->{data};
            return _fail("sse.send requires 'data' (a string)") if !defined $data || ref $data;
            my $retry = $ev->{retry};
            return _fail("sse.send 'retry' must be a non-negative integer")
              if defined $retry && ( ref $retry || $retry !~ /\A[0-9]+\z/ );
            for my $key (qw(event id)) {
                return _fail("sse.send '$key' must be a string") if ref $ev->{$key};
            }
            ( $rc, $err ) = PAGI::RS::_sse_event( $id, $ev->{event}, $data, $ev->{id}, $retry );
        }
        elsif ( $type eq 'sse.comment' ) {
            my $comment = $ev->{comment};
            return _fail("sse.comment requires 'comment' field") if !defined $comment || ref $comment;
            ( $rc, $err ) = PAGI::RS::_sse_comment( $id, $comment );
        }
        else {
            my $interval = $ev->{interval};
            return _fail("sse.keepalive requires 'interval' field") unless defined $interval;
            return _fail("sse.keepalive 'interval' must be a non-negative number")
              unless _non_negative_number($interval);
            my $ms = $interval > 0 ? int( $interval * 1000 + 0.5 ) || 1 : 0;
            $rc = PAGI::RS::_sse_keepalive( $id, $ms, $ev->{comment} // '' );
            return $DONE;
        }
        return _fail("$type: $err") if $rc < 0;
        return $rc == SENT || $rc == CLOSED ? $DONE : $self->_wait_drain($rc);
    }
    if ( $type eq 'sse.start' ) {
        return _fail("cannot send 'sse.start' after sse.http.response.start")
          if $state == DECLINING || $state == DECLINE_COMPLETE;
        return _fail("sse.start was already sent") if $state != NOT_STARTED;
        my ( $rc, $err ) = PAGI::RS::_sse_start( $id, $ev->{status} // 200, $ev->{headers} );
        return _fail("sse.start: $err") if $rc < 0;
        $self->[STREAM]  = STREAMING;
        $self->[STARTED] = 1;
        if ( my $early = delete $self->[EARLY_KEEPALIVE] ) {
            PAGI::RS::_sse_keepalive( $id, @$early );
        }
        return $DONE;
    }
    if ( $type eq 'sse.close' ) {
        return $DONE if $state == STREAM_CLOSED;    # idempotent
        return _fail("cannot send 'sse.close' before sse.start") if $state != STREAMING;
        return _fail("sse.close 'reason' must be a string") if ref $ev->{reason};
        my ( $rc, $err ) = PAGI::RS::_sse_close( $id, $ev->{reason} );
        return _fail("sse.close: $err") if $rc < 0;
        $self->[STREAM] = STREAM_CLOSED;
        $self->_response_complete unless $rc == CLOSED;
        return $DONE;
    }
    if ( $type =~ /\Ahttp\.response\.(?:start|body|trailers)\z/ && $PAGI::RS::Bridge::CURRENT_SPEC ) {
        return $self->_refuse($ev);
    }
    if ( $type eq 'sse.http.response.start' && !$PAGI::RS::Bridge::CURRENT_SPEC ) {
        return _fail("cannot decline with sse.http.response.start after sse.start")
          if $state == STREAMING || $state == STREAM_CLOSED;
        return _fail("sse.http.response.start was already sent") if $state != NOT_STARTED;
        my ( $rc, $err ) = PAGI::RS::_start( $id, $ev->{status}, $ev->{headers}, 0 );
        return _fail("sse.http.response.start: $err") if $rc < 0;
        $self->[STREAM]  = DECLINING;
        $self->[STARTED] = 1 unless $rc == CLOSED;
        return $DONE;
    }
    if ( $type eq 'sse.http.response.body' && !$PAGI::RS::Bridge::CURRENT_SPEC ) {
        return _fail("cannot send 'sse.http.response.body': decline response already complete")
          if $state == DECLINE_COMPLETE;
        return _fail("cannot send 'sse.http.response.body' without sse.http.response.start")
          if $state != DECLINING;
        my $more = $ev->{more} ? 1 : 0;
        my ( $rc, $err ) = PAGI::RS::_body( $id, $ev->{body}, $more );
        return _fail("sse.http.response.body: $err") if $rc < 0;
        unless ($more) {
            $self->[STREAM] = DECLINE_COMPLETE;
            $self->_response_complete unless $rc == CLOSED;
        }
        return $rc == SENT || $rc == CLOSED ? $DONE : $self->_wait_drain($rc);
    }
    return _fail("Unrecognized event type '$type' for sse protocol");
}

# Www 0.6: an ordinary HTTP response before sse.start refuses the stream
# (a 404, a 401, a 204 that tells EventSource to stop reconnecting).  It
# has the http scope's semantics, and the connection closes after it.
sub _refuse {
    my ( $self, $ev ) = @_;
    my $state = $self->[STREAM];
    return _fail("cannot send '$ev->{type}' after sse.start")
      if $state == STREAMING || $state == STREAM_CLOSED;
    my $f = PAGI::RS::HTTP::_send_slow( $self, $ev );
    $self->[STREAM] = DECLINING if $ev->{type} eq 'http.response.start' && !$f->is_failed;
    return $f;
}

# Www 0.3: an sse.keepalive before sse.start takes effect when it starts
# (the 0.3 reference does this, and 0.3-era helpers send it first).
sub _early_keepalive {
    my ( $self, $ev ) = @_;
    my $interval = $ev->{interval};
    return _fail("sse.keepalive requires 'interval' field") unless defined $interval;
    return _fail("sse.keepalive 'interval' must be a non-negative number")
      unless _non_negative_number($interval);
    my $ms = $interval > 0 ? int( $interval * 1000 + 0.5 ) || 1 : 0;
    $self->[EARLY_KEEPALIVE] = [ $ms, $ev->{comment} // '' ];
    return $DONE;
}

1;
