use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

# $send's fast paths read an event's keys straight from the hash's buckets
# when the hash shares its keys (src/interp/c/glue.h, hv_value): a key
# there is the one shared HEK for its text.  Perl builds hashes where that
# is not the whole story, and the event must mean the same in them:
#   - a key stored from a UTF-8 string is another HEK of the same text: a
#     miss in the buckets is no answer then;
#   - a restricted hash (Hash::Util) keeps a placeholder under a key it
#     allows but does not hold, which is no value at all; it carries magic,
#     as a tied hash does, so both are read the general way.
# Values fetched from a tied hash are read after their FETCH (convert.c).

my $app = write_app( <<'PERL', 'event_keys_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use Hash::Util ();
{
    package TiedEvent;
    sub TIEHASH  { my ( $class, %h ) = @_; return bless {%h}, $class }
    sub FETCH    { $_[0]{ $_[1] } }
    sub EXISTS   { exists $_[0]{ $_[1] } }
    sub FIRSTKEY { my @k = sort keys %{ $_[0] }; $k[0] }
    sub NEXTKEY  { my @k = sort keys %{ $_[0] }; for my $i ( 0 .. $#k - 1 ) { return $k[ $i + 1 ] if $k[$i] eq $_[1] } undef }
}
my $start = { type => 'http.response.start', status => 200, headers => [ [ 'content-type', 'text/plain' ] ] };
my %route = (
    # `more` stored from a UTF-8 string: the first body must not end the response.
    '/utf8-key' => async sub {
        my ($send) = @_;
        my $more = 'more';
        utf8::upgrade($more);
        await $send->($start);
        await $send->({ type => 'http.response.body', body => 'a', $more => 1 });
        await $send->({ type => 'http.response.body', body => 'b' });
    },
    # `body` allowed but absent (a placeholder): an empty body, and the
    # response goes on, because `more` is still read.
    '/restricted' => async sub {
        my ($send) = @_;
        my %event = ( type => 'http.response.body', more => 1 );
        Hash::Util::lock_keys_plus( %event, qw(body file fh) );
        await $send->($start);
        await $send->( \%event );
        await $send->({ type => 'http.response.body', body => 'z' });
    },
    '/tied' => async sub {
        my ($send) = @_;
        tie my %event, 'TiedEvent', type => 'http.response.body', body => 'x', more => 1;
        await $send->($start);
        await $send->( \%event );
        await $send->({ type => 'http.response.body', body => 'y' });
    },
    # An SSE event whose `data` key came from a UTF-8 string.
    '/sse' => async sub {
        my ($send) = @_;
        my $data = 'data';
        utf8::upgrade($data);
        await $send->({ type => 'sse.start', status => 200, headers => [] });
        await $send->({ type => 'sse.send', $data => 'from a utf8 key' });
        # `event` allowed but absent, probed before `id`.
        my %event = ( type => 'sse.send', data => 'restricted', id => '7' );
        Hash::Util::lock_keys_plus( %event, qw(event retry) );
        await $send->( \%event );
        await $send->({ type => 'sse.send', data => 'plain' });
        await $send->({ type => 'sse.close' });
    },
);
sub {
    my ( $scope, $receive, $send ) = @_;
    return Future->done if $scope->{type} eq 'lifespan';
    my $handler = $route{ $scope->{path} } or die "no route $scope->{path}\n";
    return $handler->($send);
};
PERL

my $s = start_server( '--no-access-log', $app );

my %want = ( '/utf8-key' => 'ab', '/restricted' => 'z', '/tied' => 'xy' );
for my $path ( sort keys %want ) {
    my $r = http_request( $s->port, 'GET', $path );
    is $r->{status}, 200, "$path: 200";
    is $r->{body}, $want{$path}, "$path: every body send counted, the response ended by the last";
}

my $sse = http_request( $s->port, 'GET', '/sse', headers => [ [ 'Accept', 'text/event-stream' ] ] );
is $sse->{status}, 200, 'sse: 200';
is $sse->{body}, "data: from a utf8 key\n\ndata: restricted\nid: 7\n\ndata: plain\n\n",
  'sse: a data key from a UTF-8 string, and a restricted event with its id';

$s->stop;
unlike $s->output, qr/panicked|Segmentation|ERROR/, 'the server logged no error';

done_testing;
