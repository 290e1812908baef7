package PagiRS::WS;

# Raw-socket WebSocket (RFC 6455) client for tests.  It has its own frame
# codec (rather than Protocol::WebSocket) so a test can send deliberately
# malformed frames: wrong lengths, unmasked frames, reserved bits/opcodes,
# bad close payloads.  Every read and write is bounded by a timeout; a
# timeout dies with a message starting "PagiRS::WS: timeout".
#
# Strings given as payloads are bytes.  A string holding characters above
# 0xFF is UTF-8 encoded first (so "\x{2603}" works); anything else is sent
# byte for byte (so "\xff" stays an invalid-UTF-8 byte).  send_text always
# UTF-8 encodes its argument.

use strict;
use warnings;
use IO::Socket::INET;
use Socket ();
use IO::Select;
use Digest::SHA qw(sha1);
use MIME::Base64 qw(encode_base64);
use Encode ();
use Errno ();
use Time::HiRes qw(time);
use Carp qw(croak);
use PagiRS::Test ();

my $GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
our %OPCODE = ( continuation => 0, cont => 0, text => 1, binary => 2, close => 8, ping => 9, pong => 10 );
our %OPNAME = reverse %OPCODE;
$OPNAME{0} = 'continuation';

# ---------------------------------------------------------------------------
# Handshake
# ---------------------------------------------------------------------------

# PagiRS::WS->connect($port, %o), $port a TCP port or 'unix:PATH' (a Unix
# socket).  Options: path ('/'), host ('127.0.0.1'),
# headers ([[k, v], ...]; a name matching a default header replaces it),
# omit ([names] of default headers to leave out), subprotocols ([...]),
# key, version (13), method ('GET'), protocol ('HTTP/1.1'), timeout (5),
# check_accept (1: die on a wrong Sec-WebSocket-Accept), auto_pong (1),
# auto_close_reply (1), mask (1: default for outgoing frames), hold_open (0:
# like a browser, half-close TCP once Close frames went both ways, so the
# server sees the transport close; 1: keep it open until ->disconnect).
# Returns the client.  A non-101 answer is not an error: ->upgraded is 0 and
# ->status/->headers/->body describe the response (status 0 if the server
# closed before sending a response head).
sub connect {
    my ( $class, $port, %o ) = @_;
    my $timeout = $o{timeout} // 5;
    my $host    = $o{host}    // '127.0.0.1';
    my $sock = $port =~ /^unix:/
      ? eval { PagiRS::Test::connect_port($port) } || croak "PagiRS::WS: cannot connect to $port: $@"
      : IO::Socket::INET->new( PeerAddr => $host, PeerPort => $port, Proto => 'tcp', Timeout => $timeout )
      || croak "PagiRS::WS: cannot connect to $host:$port: $!";
    binmode $sock;
    $sock->blocking(0);    # reads/writes go through select with deadlines
    my $self = bless {
        sock             => $sock,
        buf              => '',
        timeout          => $timeout,
        auto_pong        => $o{auto_pong} // 1,
        auto_close_reply => $o{auto_close_reply} // 1,
        hold_open        => $o{hold_open} // 0,
        mask             => $o{mask} // 1,
        eof              => 0,
        close_sent       => 0,
        close_received   => undef,
        pings            => [],
        upgraded         => 0,
    }, $class;

    my $key = $o{key} // encode_base64( join( '', map { chr int rand 256 } 1 .. 16 ), '' );
    $self->{key} = $key;
    my @h = (
        [ 'Host',                  $port =~ /^unix:/ ? 'localhost' : "$host:$port" ],
        [ 'Upgrade',               'websocket' ],
        [ 'Connection',            'Upgrade' ],
        [ 'Sec-WebSocket-Key',     $key ],
        [ 'Sec-WebSocket-Version', $o{version} // 13 ],
    );
    push @h, [ 'Sec-WebSocket-Protocol', join ', ', @{ $o{subprotocols} } ]
      if $o{subprotocols} && @{ $o{subprotocols} };
    my $extra = $o{headers} // [];
    my %replace = map { lc $_->[0] => 1 } @$extra;
    my %omit    = map { lc $_ => 1 } @{ $o{omit} // [] };
    @h = grep { !$replace{ lc $_->[0] } && !$omit{ lc $_->[0] } } @h;
    push @h, @$extra;
    my $req = sprintf "%s %s %s\r\n", $o{method} // 'GET', $o{path} // '/', $o{protocol} // 'HTTP/1.1';
    $req .= "$_->[0]: $_->[1]\r\n" for @h;
    $req .= "\r\n";
    $req .= $o{body} if defined $o{body};
    $self->{request} = $req;
    defined $self->send_raw($req) or croak "PagiRS::WS: cannot send handshake: $self->{write_error}";

    $self->_read_response( time + $timeout, $o{check_accept} // 1 );
    return $self;
}

sub _read_response {
    my ( $self, $deadline, $check_accept ) = @_;
    my $i;
    until ( ( $i = index( $self->{buf}, "\r\n\r\n" ) ) >= 0 ) {
        next if $self->_fill( $deadline, 'the handshake response head' );
        $self->{status}   = 0;    # closed before answering
        $self->{headers}  = {};
        $self->{header_list} = [];
        $self->{body}     = $self->{buf};
        $self->{buf}      = '';
        return;
    }
    my $head = substr( $self->{buf}, 0, $i + 4, '' );
    $self->{raw_head} = $head;
    my ( $proto, $status, $reason, $h, $pairs ) = PagiRS::Test::parse_head($head)
      or croak "PagiRS::WS: bad status line in '$head'";
    @$self{qw(http_protocol status reason headers header_list)} = ( $proto, $status, $reason, $h, $pairs );
    my %h = %$h;

    if ( $status == 101 ) {
        my $want = encode_base64( sha1( $self->{key} . $GUID ), '' );
        my $got  = $h{'sec-websocket-accept'} // '';
        $self->{accept_ok} = $got eq $want ? 1 : 0;
        croak "PagiRS::WS: Sec-WebSocket-Accept mismatch: got '$got', want '$want'"
          if $check_accept && !$self->{accept_ok};
        $self->{upgraded}    = 1;
        $self->{subprotocol} = $h{'sec-websocket-protocol'};
        $self->{body}        = '';
        return;    # bytes after the head stay in buf: they are frames
    }
    $self->{body} = $self->_read_http_body( \%h, $deadline );
}

# The body of a non-101 response: chunked, Content-Length or until EOF.
sub _read_http_body {
    my ( $self, $h, $deadline ) = @_;
    my $s = $self->{status};
    return '' if $s < 200 || $s == 204 || $s == 304;
    if ( ( $h->{'transfer-encoding'} // '' ) =~ /chunked/i ) {
        my $body = '';
        while (1) {
            my $i;
            until ( ( $i = index( $self->{buf}, "\r\n" ) ) >= 0 ) {
                $self->_fill( $deadline, 'a chunk size line' ) or return $body;
            }
            my $size_line = substr( $self->{buf}, 0, $i + 2, '' );
            my ($hex) = $size_line =~ /^([0-9a-fA-F]+)/ or croak "PagiRS::WS: bad chunk size line '$size_line'";
            my $n = hex $hex;
            if ( $n == 0 ) {    # trailers up to an empty line
                until ( $self->{buf} =~ /^(?:[^\r\n]+\r\n)*\r\n/ ) {
                    $self->_fill( $deadline, 'chunked trailers' ) or return $body;
                }
                $self->{buf} =~ s/^(?:[^\r\n]+\r\n)*\r\n//;
                return $body;
            }
            until ( length $self->{buf} >= $n + 2 ) {
                $self->_fill( $deadline, 'chunk data' ) or return $body . $self->{buf};
            }
            $body .= substr( $self->{buf}, 0, $n + 2, '' );
            substr( $body, -2, 2, '' );
        }
    }
    if ( defined( my $cl = $h->{'content-length'} ) ) {
        until ( length $self->{buf} >= $cl ) {
            $self->_fill( $deadline, 'the response body' ) or last;
        }
        return substr( $self->{buf}, 0, $cl, '' );
    }
    1 while $self->_fill( $deadline, 'the end of a close-delimited body' );
    my $b = $self->{buf};
    $self->{buf} = '';
    return $b;
}

# ---------------------------------------------------------------------------
# Low-level I/O
# ---------------------------------------------------------------------------

# Read what is available onto buf.  Returns bytes read, 0 at EOF (or reset),
# and on timeout dies -- or returns undef when $soft.
sub _fill {
    my ( $self, $deadline, $what, $soft ) = @_;
    return 0 if $self->{eof};
    my $n = PagiRS::Test::read_some( $self->{sock}, \$self->{buf}, $deadline, \$self->{read_error} );
    if ( !defined $n ) {
        return undef if $soft;
        croak sprintf "PagiRS::WS: timeout waiting for %s (%d bytes buffered)", $what, length $self->{buf};
    }
    $self->{eof} = 1 if $n == 0;
    return $n;
}

# Write all of $bytes.  Returns the byte count, or undef if the peer is gone
# (->write_error says why); dies if the socket stays unwritable too long.
sub send_raw {
    my ( $self, $bytes, $timeout ) = @_;
    $bytes = _bytes($bytes);
    local $SIG{PIPE} = 'IGNORE';
    my $deadline = time + ( $timeout // $self->{timeout} );
    my $sel      = IO::Select->new( $self->{sock} );
    my $off      = 0;
    while ( $off < length $bytes ) {
        my $left = $deadline - time;
        croak sprintf "PagiRS::WS: timeout writing (%d of %d bytes sent)", $off, length $bytes if $left <= 0;
        next unless $sel->can_write($left);
        my $n = syswrite( $self->{sock}, $bytes, length($bytes) - $off, $off );
        if ( !defined $n ) {
            next if $!{EINTR} || $!{EAGAIN} || $!{EWOULDBLOCK};
            $self->{write_error} = "$!";
            return undef;
        }
        $off += $n;
    }
    return $off;
}

sub _bytes {
    my ($s) = @_;
    $s //= '';
    utf8::encode($s) if $s =~ /[^\x00-\xff]/;
    utf8::downgrade($s);
    return $s;
}

sub _xor_mask {
    my ( $data, $key ) = @_;
    return $data if !length $data;
    my $k = substr( $key x ( int( length($data) / 4 ) + 1 ), 0, length $data );
    return $data ^ $k;
}

# ---------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------

# The bytes of one frame (callable as a class method too).  Options:
# fin (1), opcode (1; number or text/binary/continuation/close/ping/pong),
# payload (''), mask (the client's default, i.e. 1), mask_key (4 bytes),
# rsv (0..7) or rsv1/rsv2/rsv3, length (declared length; may lie),
# length_form (7, 16 or 64: force a length encoding, e.g. non-minimal).
sub build_frame {
    my ( $self, %o ) = @_;
    my $payload = _bytes( $o{payload} );
    my $op      = $o{opcode} // 1;
    if ( $op !~ /^\d+$/ ) {
        defined $OPCODE{$op} or croak "PagiRS::WS: unknown opcode '$op'";
        $op = $OPCODE{$op};
    }
    my $rsv  = $o{rsv} // ( ( $o{rsv1} ? 4 : 0 ) | ( $o{rsv2} ? 2 : 0 ) | ( $o{rsv3} ? 1 : 0 ) );
    my $mask = $o{mask} // ( ref $self ? $self->{mask} : 1 );
    my $len  = $o{length} // length $payload;
    my $form = $o{length_form} // ( $len < 126 ? 7 : $len < 65536 ? 16 : 64 );
    my $mbit = $mask ? 0x80 : 0;
    my $hdr  = pack 'C', ( ( $o{fin} // 1 ) ? 0x80 : 0 ) | ( ( $rsv & 7 ) << 4 ) | ( $op & 0x0f );
    if    ( $form == 7 )  { $hdr .= pack 'C',   $mbit | ( $len & 0x7f ) }
    elsif ( $form == 16 ) { $hdr .= pack 'Cn',  $mbit | 126, $len }
    elsif ( $form == 64 ) { $hdr .= pack 'CQ>', $mbit | 127, $len }
    else                  { croak "PagiRS::WS: length_form must be 7, 16 or 64" }
    if ($mask) {
        my $key = $o{mask_key} // pack 'N', int rand 2**32;
        $hdr .= $key;
        $payload = _xor_mask( $payload, $key );
    }
    return $hdr . $payload;
}

# send_frame(%build_frame_options), or send_frame(raw => $bytes) to write
# bytes as they are.  Returns bytes written (undef if the peer is gone).
sub send_frame {
    my ( $self, %o ) = @_;
    my $bytes = exists $o{raw} ? $o{raw} : $self->build_frame(%o);
    $self->{close_sent} = 1 if !exists $o{raw} && ( $o{opcode} // '' ) =~ /^(?:8|close)$/;
    return $self->send_raw($bytes);
}

sub send_text {
    my ( $self, $str, %o ) = @_;
    return $self->send_frame( %o, opcode => 1, payload => Encode::encode( 'UTF-8', $str // '' ) );
}

sub send_binary {
    my ( $self, $bytes, %o ) = @_;
    return $self->send_frame( %o, opcode => 2, payload => $bytes );
}

# One message as several frames: $opcode ('text'/'binary'/number) on the
# first, continuation after, FIN on the last.  Parts are bytes (split a
# UTF-8 sequence across parts on purpose if you like).
sub send_fragmented {
    my ( $self, $opcode, @parts ) = @_;
    croak "PagiRS::WS: send_fragmented needs at least one part" unless @parts;
    my $total = 0;
    for my $i ( 0 .. $#parts ) {
        my $n = $self->send_frame( opcode => $i == 0 ? $opcode : 0, fin => $i == $#parts ? 1 : 0, payload => $parts[$i] );
        return undef unless defined $n;
        $total += $n;
    }
    return $total;
}

sub ping { my ( $self, $data ) = @_; $self->send_frame( opcode => 9,  payload => $data ) }
sub pong { my ( $self, $data ) = @_; $self->send_frame( opcode => 10, payload => $data ) }

# Close frame with a status code and reason (reason is bytes, see above);
# no code: an empty close payload.
sub close {
    my ( $self, $code, $reason ) = @_;
    my $payload = defined $code ? pack( 'n', $code ) . _bytes($reason) : '';
    return $self->close_raw($payload);
}

# Close frame with an arbitrary payload (1-byte, over-long, bad UTF-8...).
sub close_raw {
    my ( $self, $payload ) = @_;
    $self->{close_sent} = 1;
    my $n = $self->send_frame( opcode => 8, payload => $payload );
    $self->_closing_handshake_done;
    return $n;
}

# Close frames went both ways: the client's part of the TCP close is a FIN
# (reading goes on, for anything a faulty server sends after its Close).
sub _closing_handshake_done {
    my ($self) = @_;
    return if $self->{hold_open} || $self->{half_closed} || !$self->{sock};
    return unless $self->{close_sent} && $self->{close_received};
    $self->{half_closed} = 1;
    shutdown( $self->{sock}, 1 );
}

# Drop the TCP connection without a close frame (abort by default: RST).
sub disconnect {
    my ( $self, %o ) = @_;
    return unless $self->{sock};
    setsockopt( $self->{sock}, Socket::SOL_SOCKET(), Socket::SO_LINGER(), pack( 'ii', 1, 0 ) )
      unless $o{graceful};
    CORE::close( $self->{sock} );
    $self->{sock} = undef;
}

# Half-close: send FIN, keep reading.
sub shutdown_write { shutdown( $_[0]{sock}, 1 ) }

# ---------------------------------------------------------------------------
# Receiving
# ---------------------------------------------------------------------------

# Parse one frame off buf; undef if it is not all there yet.
sub _parse_frame {
    my ($self) = @_;
    my $b = \$self->{buf};
    return undef if length $$b < 2;
    my ( $b0, $b1 ) = unpack 'CC', $$b;
    my ( $len, $off ) = ( $b1 & 0x7f, 2 );
    if ( $len == 126 ) {
        return undef if length $$b < 4;
        ( $len, $off ) = ( unpack( 'n', substr( $$b, 2, 2 ) ), 4 );
    }
    elsif ( $len == 127 ) {
        return undef if length $$b < 10;
        ( $len, $off ) = ( unpack( 'Q>', substr( $$b, 2, 8 ) ), 10 );
    }
    my $key;
    if ( $b1 & 0x80 ) {    # servers must not mask, but decode it so a test can see it did
        return undef if length $$b < $off + 4;
        $key = substr( $$b, $off, 4 );
        $off += 4;
    }
    return undef if length $$b < $off + $len;
    my $payload = substr( $$b, $off, $len );
    substr( $$b, 0, $off + $len, '' );
    $payload = _xor_mask( $payload, $key ) if defined $key;
    my $op = $b0 & 0x0f;
    return {
        fin     => ( $b0 >> 7 ) & 1,
        rsv     => ( $b0 >> 4 ) & 7,
        opcode  => $op,
        type    => $OPNAME{$op} // "reserved-$op",
        masked  => defined $key ? 1 : 0,
        length  => $len,
        payload => $payload,
    };
}

# One frame: {fin, rsv, opcode, type, masked, length, payload}.  undef at
# EOF (->eof is then true); dies on timeout.  Does not answer pings.
sub recv_frame {
    my ( $self, $timeout ) = @_;
    my $deadline = time + ( $timeout // $self->{timeout} );
    while (1) {
        my $f = $self->_parse_frame;
        return $f if $f;
        $self->_fill( $deadline, 'a frame' ) or return undef;
    }
}

# One message, fragments joined.  Returns a hashref:
#   {type => 'text', data => characters, bytes => raw, frames => n, rsv}
#     (utf8_error => 1 and data = raw bytes if the text is not valid UTF-8)
#   {type => 'binary', data => bytes, frames, rsv}
#   {type => 'ping'|'pong', data}   (pings only when auto_pong is off;
#     answered pings are recorded in ->pings)
#   {type => 'close', code, reason, data => raw payload}
#     (code 1005 for an empty payload, undef for a 1-byte payload;
#      reason decoded from UTF-8 if valid, else raw bytes + utf8_error)
# undef at EOF; dies on timeout or on a server protocol error.
sub recv_message {
    my ( $self, $timeout ) = @_;
    my $deadline = time + ( $timeout // $self->{timeout} );
    my ( $msg, $data );
    while (1) {
        my $left = $deadline - time;
        my $f    = $self->recv_frame( $left > 0 ? $left : 0 ) or return undef;
        my $op   = $f->{opcode};
        if ( $op == 9 ) {
            push @{ $self->{pings} }, $f->{payload};
            return { type => 'ping', data => $f->{payload} } unless $self->{auto_pong};
            $self->pong( $f->{payload} );
            next;
        }
        return { type => 'pong', data => $f->{payload} } if $op == 10;
        return $self->_got_close($f) if $op == 8;
        if ( $op == 0 ) {
            croak "PagiRS::WS: protocol error from server: continuation frame with no message in progress"
              unless $msg;
            $data .= $f->{payload};
            $msg->{frames}++;
        }
        elsif ( $op == 1 || $op == 2 ) {
            croak "PagiRS::WS: protocol error from server: new data frame (opcode $op) inside a fragmented message"
              if $msg;
            $msg  = { type => $op == 1 ? 'text' : 'binary', frames => 1, rsv => $f->{rsv} };
            $data = $f->{payload};
        }
        else {
            croak "PagiRS::WS: protocol error from server: reserved opcode $op";
        }
        next unless $f->{fin};
        if ( $msg->{type} eq 'text' ) {
            $msg->{bytes} = $data;
            my $chars = eval { Encode::decode( 'UTF-8', my $copy = $data, Encode::FB_CROAK() ) };
            if   ( defined $chars ) { $msg->{data} = $chars }
            else                    { $msg->{data} = $data; $msg->{utf8_error} = 1 }
        }
        else { $msg->{data} = $data }
        return $msg;
    }
}

sub _got_close {
    my ( $self, $f ) = @_;
    my $p = $f->{payload};
    my %m = ( type => 'close', data => $p, code => undef, reason => '' );
    if ( length $p == 0 ) { $m{code} = 1005 }
    elsif ( length $p >= 2 ) {
        $m{code} = unpack 'n', $p;
        my $r = substr( $p, 2 );
        my $chars = eval { Encode::decode( 'UTF-8', my $copy = $r, Encode::FB_CROAK() ) };
        if   ( defined $chars ) { $m{reason} = $chars }
        else                    { $m{reason} = $r; $m{utf8_error} = 1 }
    }
    $self->{close_received} = \%m;
    # RFC 6455 5.5.1: answer a close we did not start, echoing its code.
    if ( $self->{auto_close_reply} && !$self->{close_sent} ) {
        $self->close_raw( length $p >= 2 ? substr( $p, 0, 2 ) : '' );
    }
    $self->_closing_handshake_done;
    return \%m;
}

# Read (and drop; see ->skipped) messages until a close frame.  Returns
# (code, reason) -- code alone in scalar context -- or empty/undef on EOF
# or timeout.  A close already received is returned again.
sub wait_close {
    my ( $self, $timeout ) = @_;
    my $deadline = time + ( $timeout // $self->{timeout} );
    while ( !$self->{close_received} ) {
        my $left = $deadline - time;
        return if $left <= 0 && !length $self->{buf};
        my $m = eval { $self->recv_message( $left > 0 ? $left : 0 ) };
        if ( !$m ) {
            return if !$@ || $@ =~ /^PagiRS::WS: timeout/;
            die $@;
        }
        push @{ $self->{skipped} }, $m unless $m->{type} eq 'close';
    }
    my $c = $self->{close_received};
    return wantarray ? ( $c->{code}, $c->{reason} ) : $c->{code};
}

# True once the server has closed the TCP connection (within $timeout);
# false on timeout.  Bytes that arrive meanwhile stay readable as frames.
sub eof_within {
    my ( $self, $timeout ) = @_;
    my $deadline = time + ( $timeout // $self->{timeout} );
    while ( !$self->{eof} ) {
        defined $self->_fill( $deadline, 'EOF', 1 ) or return 0;
    }
    return 1;
}

# ---------------------------------------------------------------------------
# Accessors
# ---------------------------------------------------------------------------

sub upgraded       { $_[0]{upgraded} }                       # 1 after a 101 (accept checked)
sub status         { $_[0]{status} }                         # handshake status (0: closed before a head)
sub reason         { $_[0]{reason} }
sub headers        { $_[0]{headers} }                        # {lc name => value; repeats joined ", "}
sub header_list    { $_[0]{header_list} }                    # [[lc name, value], ...] in order
sub header         { $_[0]{headers}{ lc $_[1] } }
sub body           { $_[0]{body} }                           # body of a non-101 response
sub subprotocol    { $_[0]{subprotocol} }                    # Sec-WebSocket-Protocol chosen
sub accept_ok      { $_[0]{accept_ok} }
sub request        { $_[0]{request} }                        # handshake bytes sent
sub raw_head       { $_[0]{raw_head} }
sub sock           { $_[0]{sock} }
sub eof            { $_[0]{eof} }                            # TCP EOF seen
sub close_sent     { $_[0]{close_sent} }
sub close_received { $_[0]{close_received} }                 # the close message hashref, or undef
sub pings          { $_[0]{pings} }                          # payloads of pings received
sub skipped        { $_[0]{skipped} // [] }                  # messages wait_close dropped
sub buffered       { length $_[0]{buf} }

sub response {
    my ($self) = @_;
    return {
        status      => $self->{status},
        reason      => $self->{reason},
        headers     => $self->{headers},
        header_list => $self->{header_list},
        body        => $self->{body},
    };
}

1;
