package PagiRS::SSE;

# Raw-socket Server-Sent Events client for tests.  Sends one request, reads
# the response head, then de-chunks the body incrementally and parses it as
# text/event-stream per the WHATWG HTML spec (9.2.6).  Keeps both the wire
# bytes and the de-chunked body so tests can assert exact output.  Every
# read is bounded by a timeout; a timeout dies with a message starting
# "PagiRS::SSE: timeout".

use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;
use Encode ();
use Errno ();
use Time::HiRes qw(time);
use Carp qw(croak);
use PagiRS::Test ();

# PagiRS::SSE->open($port, $path, %o), $port a TCP port or 'unix:PATH'.
# Options: method ('GET'), headers
# ([[k, v], ...]; a name matching a default -- Host, Accept -- replaces it),
# body (sent with a Content-Length unless headers carry one), host
# ('127.0.0.1'), timeout (5).  Returns the client after the response head is
# in, whatever the status.
sub open {
    my ( $class, $port, $path, %o ) = @_;
    my $timeout = $o{timeout} // 5;
    my $host    = $o{host}    // '127.0.0.1';
    my $sock = $port =~ /^unix:/
      ? eval { PagiRS::Test::connect_port($port) } || croak "PagiRS::SSE: cannot connect to $port: $@"
      : IO::Socket::INET->new( PeerAddr => $host, PeerPort => $port, Proto => 'tcp', Timeout => $timeout )
      || croak "PagiRS::SSE: cannot connect to $host:$port: $!";
    binmode $sock;
    $sock->blocking(0);
    my $self = bless {
        sock     => $sock,
        timeout  => $timeout,
        in       => '',    # socket bytes not yet de-framed
        wire     => '',    # every byte after the response head, framing included
        body     => '',    # de-chunked body so far
        pending  => '',    # body bytes not yet parsed into lines
        comments => [],
        last_id  => '',
        cur      => _fresh_event(),
        ended    => 0,
        complete => 0,
        eof      => 0,
        bom_done => 0,
        chunk_sizes => [],
        trailers    => [],
    }, $class;

    my $method = $o{method} // 'GET';
    my @h = ( [ 'Host', $port =~ /^unix:/ ? 'localhost' : "$host:$port" ], [ 'Accept', 'text/event-stream' ] );
    my $extra = $o{headers} // [];
    my %replace = map { lc $_->[0] => 1 } @$extra;
    @h = grep { !$replace{ lc $_->[0] } } @h;
    push @h, @$extra;
    my $body = $o{body};
    if ( defined $body ) {
        utf8::encode($body) if $body =~ /[^\x00-\xff]/;
        push @h, [ 'Content-Length', length $body ] unless $replace{'content-length'} || $replace{'transfer-encoding'};
    }
    my $req = "$method $path HTTP/1.1\r\n" . join( '', map { "$_->[0]: $_->[1]\r\n" } @h ) . "\r\n" . ( $body // '' );
    $self->{request} = $req;
    $self->_write($req);
    $self->_read_head( time + $timeout );
    return $self;
}

sub _write {
    my ( $self, $bytes ) = @_;
    local $SIG{PIPE} = 'IGNORE';
    my $deadline = time + $self->{timeout};
    my $sel      = IO::Select->new( $self->{sock} );
    my $off      = 0;
    while ( $off < length $bytes ) {
        croak "PagiRS::SSE: timeout sending the request" if time >= $deadline;
        next unless $sel->can_write( $deadline - time );
        my $n = syswrite( $self->{sock}, $bytes, length($bytes) - $off, $off );
        if ( !defined $n ) {
            next if $!{EINTR} || $!{EAGAIN} || $!{EWOULDBLOCK};
            croak "PagiRS::SSE: cannot send the request: $!";
        }
        $off += $n;
    }
}

# One sysread into $self->{in}.  Returns bytes read, 0 at EOF; on timeout
# dies, or returns undef when $soft.
sub _read {
    my ( $self, $deadline, $what, $soft ) = @_;
    return 0 if $self->{eof};
    my $n = PagiRS::Test::read_some( $self->{sock}, \$self->{in}, $deadline, \$self->{read_error} );
    if ( !defined $n ) {
        return undef if $soft;
        croak sprintf "PagiRS::SSE: timeout waiting for %s (%d body bytes so far)", $what, length $self->{body};
    }
    $self->{eof} = 1 if $n == 0;
    $self->{wire} .= substr( $self->{in}, -$n ) if $n && defined $self->{framing};    # after the head
    return $n;
}

sub _read_head {
    my ( $self, $deadline ) = @_;
    my $i;
    until ( ( $i = index( $self->{in}, "\r\n\r\n" ) ) >= 0 ) {
        next if $self->_read( $deadline, 'the response head' );
        croak "PagiRS::SSE: connection closed before a response head (got '$self->{in}')";
    }
    my $head = substr( $self->{in}, 0, $i + 4, '' );
    $self->{raw_head} = $head;
    my ( $proto, $status, $reason, $h, $pairs ) = PagiRS::Test::parse_head($head)
      or croak "PagiRS::SSE: bad status line in '$head'";
    @$self{qw(protocol status reason headers header_list)} = ( $proto, $status, $reason, $h, $pairs );
    my %h = %$h;
    my $method = ( $self->{request} =~ /^(\S+)/ )[0];
    if ( $method eq 'HEAD' || $status < 200 || $status == 204 || $status == 304 ) {
        $self->{framing} = 'none';
        @$self{qw(ended complete)} = ( 1, 1 );
    }
    elsif ( ( $h{'transfer-encoding'} // '' ) =~ /chunked/i ) {
        $self->{framing} = 'chunked';
        $self->{cstate}  = 'size';
    }
    elsif ( defined $h{'content-length'} ) {
        $self->{framing} = 'length';
        $self->{left}    = $h{'content-length'};
        @$self{qw(ended complete)} = ( 1, 1 ) if $self->{left} == 0;
    }
    else { $self->{framing} = 'close' }
    $self->{wire} = $self->{in};
    $self->_deframe;
}

# Move de-framed body bytes from {in} to {body}/{pending}.
sub _deframe {
    my ($self) = @_;
    my $f = $self->{framing};
    if ( $f eq 'close' ) {
        $self->_add_body( $self->{in} );
        $self->{in} = '';
    }
    elsif ( $f eq 'length' ) {
        return if $self->{ended};
        my $take = substr( $self->{in}, 0, $self->{left}, '' );
        $self->_add_body($take);
        $self->{left} -= length $take;
        @$self{qw(ended complete)} = ( 1, 1 ) if $self->{left} == 0;
    }
    elsif ( $f eq 'chunked' ) {
        while ( !$self->{ended} ) {
            my $st = $self->{cstate};
            if ( $st eq 'size' ) {
                my $i = index( $self->{in}, "\r\n" );
                return if $i < 0;
                my $line = substr( $self->{in}, 0, $i + 2, '' );
                my ($hex) = $line =~ /^([0-9a-fA-F]+)/ or croak "PagiRS::SSE: bad chunk size line '$line'";
                my $n = hex $hex;
                if ( $n == 0 ) { $self->{cstate} = 'trailers'; next }
                push @{ $self->{chunk_sizes} }, $n;
                @$self{qw(cleft cstate)} = ( $n, 'data' );
            }
            elsif ( $st eq 'data' ) {
                return if $self->{in} eq '';
                my $take = substr( $self->{in}, 0, $self->{cleft}, '' );
                $self->_add_body($take);
                $self->{cleft} -= length $take;
                $self->{cstate} = 'crlf' if $self->{cleft} == 0;
            }
            elsif ( $st eq 'crlf' ) {
                return if length $self->{in} < 2;
                substr( $self->{in}, 0, 2, '' ) eq "\r\n" or croak "PagiRS::SSE: chunk data not followed by CRLF";
                $self->{cstate} = 'size';
            }
            else {    # trailers, then the empty line that ends the body
                my $i = index( $self->{in}, "\r\n" );
                return if $i < 0;
                my $line = substr( $self->{in}, 0, $i + 2, '' );
                $line =~ s/\r\n\z//;
                if ( $line eq '' ) { @$self{qw(ended complete)} = ( 1, 1 ); return }
                push @{ $self->{trailers} }, $line;
            }
        }
    }
}

sub _add_body {
    my ( $self, $bytes ) = @_;
    $self->{body}    .= $bytes;
    $self->{pending} .= $bytes;
}

# Read once more from the socket.  1 on progress, 0 if the body is over,
# undef on a soft timeout; dies on a hard one.
sub _pump {
    my ( $self, $deadline, $what, $soft ) = @_;
    return 0 if $self->{ended};
    my $n = $self->_read( $deadline, $what, $soft );
    return undef unless defined $n;
    if ( $n == 0 ) {    # TCP EOF: the body ends here, complete only if close-delimited
        $self->{ended}    = 1;
        $self->{complete} = 1 if $self->{framing} eq 'close';
        return 0;
    }
    $self->_deframe;
    return 1;
}

sub _fresh_event { { data => '', type => '', retry => undef, id_set => 0, fields => [] } }

# Next complete line from pending (without its terminator), or undef.
sub _next_line {
    my ($self) = @_;
    my $p = \$self->{pending};
    if ( !$self->{bom_done} ) {    # one leading U+FEFF is dropped
        return undef if length $$p < 3 && !$self->{ended} && "\xEF\xBB\xBF" =~ /^\Q$$p\E/;
        $$p =~ s/^\xEF\xBB\xBF//;
        $self->{bom_done} = 1;
    }
    $$p =~ /\A([^\r\n]*)(\r\n|\n|\r)/ or return undef;
    my ( $line, $eol ) = ( $1, $2 );
    # A CR at the very end may be half of a CRLF split across reads.
    return undef if $eol eq "\r" && length($line) + 1 == length $$p && !$self->{ended};
    substr( $$p, 0, length($line) + length($eol), '' );
    return Encode::decode( 'UTF-8', $line );    # invalid bytes become U+FFFD, as the spec says
}

# Apply one line; returns an event hashref when a blank line dispatches one.
sub _line {
    my ( $self, $line ) = @_;
    my $cur = $self->{cur};
    if ( $line eq '' ) {
        $self->{cur} = _fresh_event();
        return undef if $cur->{data} eq '';    # no data: nothing dispatched (id/retry still apply)
        ( my $data = $cur->{data} ) =~ s/\n\z//;
        return {
            event  => length $cur->{type} ? $cur->{type} : 'message',
            data   => $data,
            id     => $self->{last_id},    # the last event ID in force, as EventSource reports it
            id_set => $cur->{id_set},      # whether this event carried an id field
            retry  => $cur->{retry},       # retry value given in this event, if any
            fields => $cur->{fields},      # [[name, value], ...] as received
        };
    }
    if ( $line =~ /^:/ ) {
        ( my $c = substr( $line, 1 ) ) =~ s/^ //;
        push @{ $self->{comments} }, $c;
        return undef;
    }
    my ( $name, $value ) = $line =~ /^([^:]*)(?::(.*))?\z/s;
    $value //= '';
    $value =~ s/^ //;
    push @{ $cur->{fields} }, [ $name, $value ];
    if    ( $name eq 'data' )  { $cur->{data} .= "$value\n" }
    elsif ( $name eq 'event' ) { $cur->{type} = $value }
    elsif ( $name eq 'id' ) {
        if ( $value !~ /\x00/ ) { $self->{last_id} = $value; $cur->{id_set} = 1 }
    }
    elsif ( $name eq 'retry' ) {
        if ( $value =~ /^[0-9]+\z/ ) { $cur->{retry} = $value; $self->{retry} = $value }
    }
    return undef;
}

# The next dispatched event: {event, data, id, id_set, retry, fields}.
# undef once the body has ended (an unterminated last event is dropped, per
# spec); dies on timeout.
sub next_event {
    my ( $self, $timeout ) = @_;
    my $deadline = time + ( $timeout // $self->{timeout} );
    while (1) {
        while ( defined( my $line = $self->_next_line ) ) {
            my $ev = $self->_line($line);
            return $ev if $ev;
        }
        return undef if $self->{ended};
        $self->_pump( $deadline, 'the next event' );
    }
}

# All remaining events until the body ends (dies on timeout).
sub all_events {
    my ( $self, $timeout ) = @_;
    my $deadline = time + ( $timeout // $self->{timeout} );
    my @ev;
    while ( my $e = $self->next_event( $deadline - time ) ) { push @ev, $e }
    return @ev;
}

# Wait for the body to end (last chunk, Content-Length reached, or TCP EOF).
# 1 if it did, 0 on timeout.  Unparsed events stay available.
sub wait_eof {
    my ( $self, $timeout ) = @_;
    my $deadline = time + ( $timeout // $self->{timeout} );
    while ( !$self->{ended} ) {
        defined $self->_pump( $deadline, 'end of body', 1 ) or return 0;
    }
    return 1;
}

# Wait for the server to close the TCP connection; 1 if it did, 0 on timeout.
sub wait_tcp_eof {
    my ( $self, $timeout ) = @_;
    my $deadline = time + ( $timeout // $self->{timeout} );
    while ( !$self->{eof} ) {
        my $r = $self->{ended} ? $self->_read( $deadline, 'TCP EOF', 1 ) : $self->_pump( $deadline, 'TCP EOF', 1 );
        return 0 unless defined $r;
    }
    return 1;
}

sub close {
    my ($self) = @_;
    CORE::close( $self->{sock} ) if $self->{sock};
    $self->{sock} = undef;
}

sub status      { $_[0]{status} }
sub reason      { $_[0]{reason} }
sub headers     { $_[0]{headers} }        # {lc name => value; repeats joined ", "}
sub header_list { $_[0]{header_list} }    # [[lc name, value], ...] in order
sub header      { $_[0]{headers}{ lc $_[1] } }
sub raw         { $_[0]{body} }           # de-chunked body bytes received so far
sub wire        { $_[0]{wire} }           # bytes after the head as sent (chunk framing included)
sub raw_head    { $_[0]{raw_head} }
sub request     { $_[0]{request} }
sub comments    { @{ $_[0]{comments} } }  # comment lines' text (after ':' and one space)
sub last_id     { $_[0]{last_id} }
sub retry       { $_[0]{retry} }          # latest valid retry value seen
sub chunk_sizes { $_[0]{chunk_sizes} }    # sizes of the data chunks, in order
sub trailers    { $_[0]{trailers} }
sub framing     { $_[0]{framing} }        # chunked | length | close | none
sub ended       { $_[0]{ended} }
sub complete    { $_[0]{complete} }       # body ended properly (not cut off)
sub eof         { $_[0]{eof} }
sub sock        { $_[0]{sock} }

sub response {
    my ($self) = @_;
    return { status => $self->{status}, reason => $self->{reason}, headers => $self->{headers},
        header_list => $self->{header_list}, body => $self->{body} };
}

1;
