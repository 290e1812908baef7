use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use Digest::SHA qw(sha1_hex);
use JSON::PP ();

# A request-body chunk's string takes over the buffer the network joined
# the chunk into (malloc.rs's PerlBuffer, convert.c's body_sv): no copy on
# the interpreter's side, and from then on an ordinary Perl string that
# Perl frees and grows itself.  Whatever an app does with it must work as
# with any string: change it in place, grow it (a realloc of that buffer),
# shrink it, copy it, decode it, read it through a filehandle, keep it
# after its request has ended.

my $JSON = JSON::PP->new->canonical;

my $app = write_app( <<'APP', 'adopted.pl' );
use strict;
use warnings;
use Future::AsyncAwait;
use Digest::SHA qw(sha1_hex);
use JSON::PP ();

my $J = JSON::PP->new->canonical;
my @kept;    # chunks kept past their request: /keep, then /kept

my %op = (
    # In place: the buffer is the string's own.
    upper  => sub { $_[0] =~ tr/a-z/A-Z/; $_[0] },
    # Grown far past the buffer: realloc.
    append => sub { $_[0] .= '!' x 100_000; $_[0] },
    # One byte more: the spare room after the NUL, or a realloc.
    one    => sub { $_[0] .= '+'; $_[0] },
    # Shrunk from the front (Perl's offset trick) and the end.
    trim   => sub { substr( $_[0], 0, 3, '' ); chop $_[0]; $_[0] },
    # A copy changed: the chunk itself must not change.
    copy   => sub { my $c = $_[0]; substr( $c, 0, 1, 'Z' ); $_[0] . '|' . $c },
    # Read back through an in-memory filehandle, line by line.
    lines  => sub { open my $fh, '<', \$_[0] or die $!; join '', map { "<$_>" } <$fh> },
    # Characters, not bytes.
    decode => sub { utf8::decode( $_[0] ) or die "not UTF-8\n"; length( $_[0] ) . ':' . ( $_[0] =~ /\x{263A}\z/ ? 1 : 0 ) },
    # A regex anchored at the end reads up to the NUL.
    anchor => sub { $_[0] =~ /(\w+)\z/ ? $1 : '' },
    keep   => sub { push @kept, $_[0]; '' },
);

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    my ( $path, $out ) = ( $scope->{path}, '' );
    my ( $before, @chunks ) = ( PAGI::RS::_adopted_bodies() );
    while (1) {
        my $e = await $receive->();
        last if $e->{type} ne 'http.request';
        push @chunks, length $e->{body};
        if ( my $op = $op{ substr $path, 1 } ) {
            $out .= $op->( $e->{body} );
        }
        last unless $e->{more};
    }
    $out = join '', @kept if $path eq '/kept';
    my $body = $J->encode( {
        out     => length $out <= 300 ? $out : undef,
        len     => length $out,
        sha     => sha1_hex( utf8::is_utf8($out) ? do { my $b = $out; utf8::encode($b); $b } : $out ),
        chunks  => \@chunks,
        adopted => PAGI::RS::_adopted_bodies() - $before,
    } );
    await $send->( { type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'application/json' ], [ 'content-length', length $body ] ] } );
    await $send->( { type => 'http.response.body', body => $body, more => 0 } );
};
$app;
APP

my $server = start_server( '--no-access-log', $app );
my $port   = $server->port;

sub post {
    my ( $path, $body ) = @_;
    my $res = http_request( $port, 'POST', $path, body => $body );
    is $res->{status}, 200, "POST $path answers 200" or return {};
    return eval { $JSON->decode( $res->{body} ) } // {};
}

subtest 'each chunk of a body is adopted, not copied' => sub {
    my $body = join '', map { chr( 32 + $_ % 90 ) } 1 .. 300_000;
    my $got  = post( '/plain', $body );
    my @chunks = @{ $got->{chunks} // [] };
    cmp_ok scalar @chunks, '>=', 2, 'the body came in several chunks';
    is eval { my $n = 0; $n += $_ for @chunks; $n }, 300_000, 'all of it';
    is $got->{adopted}, scalar( grep { $_ > 0 } @chunks ), 'every non-empty chunk adopted';
};

subtest 'an adopted string changed in place, grown, shrunk and copied' => sub {
    my $got = post( '/upper', 'hello, world' );
    is $got->{out}, 'HELLO, WORLD', 'tr/// in place';
    is $got->{adopted}, 1, 'adopted';

    my $big = 'abc' x 50_000;
    $got = post( '/append', $big );
    my $want = join '', map { $_ . ( '!' x 100_000 ) } chunks_of( $big, $got->{chunks} );
    is $got->{len}, length $want, 'grown by realloc: the length';
    is $got->{sha}, sha1_hex($want), 'and the bytes';

    $got = post( '/one', 'x' x 20 );
    is $got->{out}, ( 'x' x 20 ) . '+', 'one byte more';

    $got = post( '/trim', 'abcdefgh' );
    is $got->{out}, 'defg', 'shrunk at both ends';

    $got = post( '/copy', 'original' );
    is $got->{out}, 'original|Zriginal', 'a copy changes alone';
};

subtest 'read as lines, decoded, matched at its end' => sub {
    my $got = post( '/lines', "one\ntwo\nthree" );
    is $got->{out}, "<one\n><two\n><three>", 'an in-memory filehandle over it';

    my $text = "caf\xc3\xa9 \xe2\x98\xba";    # café ☺ in UTF-8
    $got = post( '/decode', $text );
    is $got->{out}, '6:1', 'utf8::decode: six characters, ending in U+263A';

    $got = post( '/anchor', 'last word' );
    is $got->{out}, 'word', '/\z/ finds the end';
};

subtest 'a chunk kept after its request stays whole' => sub {
    my @bodies = map { join '', map { chr( 65 + ( $_ * $_ ) % 26 ) } 1 .. $_ } 1000, 70_000, 5;
    post( '/keep', $_ ) for @bodies;
    # Other requests come and go in between, reusing whatever memory they can.
    post( '/plain', 'z' x 100_000 ) for 1 .. 5;
    my $got = post( '/kept', '' );
    my $want = join '', @bodies;
    is $got->{len}, length $want, 'the kept chunks: their length';
    is $got->{sha}, sha1_hex($want), 'and their bytes';
};

# The chunks the app saw, cut from $body by their lengths.
sub chunks_of {
    my ( $body, $lengths ) = @_;
    my ( $at, @parts ) = (0);
    for my $n (@$lengths) {
        push @parts, substr( $body, $at, $n );
        $at += $n;
    }
    return @parts;
}

done_testing;
