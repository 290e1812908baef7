package PAGI::RS::Loader;

# Loads the application the way the reference runner does: a file that
# returns an app (with $0 localised for FindBin; otherwise $0 is the
# server's program name, option P), a module constructed with
# key=value arguments, or -e code after -M modules.  Every failure dies with
# a message naming what failed, before the server binds a port.

use strict;
use warnings;
use File::Spec;
use Scalar::Util qw(blessed reftype);
use PAGI::RS::Constants qw(log);

sub load {
    my ( $kind, $what, @options ) = @_;
    my ( @inc, @modules, %args, $lint );
    for my $opt (@options) {
        my ( $tag, $value ) = ( substr( $opt, 0, 1 ), substr( $opt, 1 ) );
        if    ( $tag eq 'I' ) { push @inc, $value }
        elsif ( $tag eq 'M' ) { push @modules, $value }
        elsif ( $tag eq 'L' ) { $lint = 1 }
        elsif ( $tag eq 'P' ) { $0 = $value }
        elsif ( $tag eq 'A' ) {
            my ( $k, $v ) = split /=/, $value, 2;
            $args{$k} = $v;
        }
    }
    unshift @INC, map { File::Spec->rel2abs($_) } @inc;

    for my $spec (@modules) {
        my ( $module, $imports ) = split /=/, $spec, 2;
        _check_module_name($module);
        my @imports = defined $imports ? split( /,/, $imports ) : ();
        my $ok = eval "package main; require $module; $module->import(\@imports); 1";
        die "Cannot load module $module: $@" unless $ok;
    }

    my $app;
    if ( $kind eq 'file' ) {
        $app = _normalize( _load_file($what), 'App file' );
    }
    elsif ( $kind eq 'module' ) {
        $app = _load_module( $what, \%args );
    }
    elsif ( $kind eq 'directory' ) {
        $app = _load_current_directory( $what, \%args );
    }
    else {
        my $result = eval "package main; no strict; no warnings; $what";
        die "Error evaluating -e code: $@" if $@;
        $app = _normalize( $result, '-e code' );
    }
    $PAGI::RS::Bridge::APP = $lint ? _lint($app) : $app;
    return '';
}

# --log-format json: warnings (the app's, its modules', Perl's own) become
# lines of the server's log instead of raw text in a stream of JSON.  Set
# before the app is compiled, so compile-time warnings are caught too; an
# app that sets its own $SIG{__WARN__} still has the last word.
sub route_warnings_to_log {
    $SIG{__WARN__} = sub { PAGI::RS::_log( LOG_WARN, $_[0] ) };
    return '';
}

# -E development: the reference runner wraps the app in PAGI-Tools' Lint
# (strict) when it is installed, and says so when it is not.
sub _lint {
    my ($app) = @_;
    if ( eval { require PAGI::Middleware::Lint; 1 } ) {
        my $wrapped = PAGI::Middleware::Lint->new( strict => 1 )->wrap($app);
        PAGI::RS::_log( LOG_INFO, "development mode: PAGI::Middleware::Lint enabled" );
        return $wrapped;
    }
    die "Cannot load PAGI::Middleware::Lint: $@" unless $@ =~ m{^Can't locate PAGI/Middleware/Lint\.pm};
    PAGI::RS::_log( LOG_INFO, "development mode: Lint unavailable (install PAGI-Tools)" );
    return $app;
}

sub _check_module_name {
    my ($name) = @_;
    die "Invalid module name: $name\n" unless $name =~ /\A[A-Za-z_]\w*(?:::[A-Za-z_]\w*)*\z/;
}

sub _load_file {
    my ($file) = @_;
    my $abs = File::Spec->rel2abs($file);
    die "App file not found: $abs\n" unless -f $abs;
    local $0    = $abs;
    local @ARGV = ($abs);
    FindBin::again() if defined &FindBin::again;
    local $!;
    my $result = do $abs;
    die "Error loading $file: $@" if $@;
    die "Error reading $file: $!\n" if !defined $result && $!;
    return $result;
}

# No app named: the reference runner serves the current directory with
# PAGI::App::Directory, which lives in PAGI-Tools (not packaged for Debian);
# without it, say so rather than "Can't locate".
sub _load_current_directory {
    my ( $module, $args ) = @_;
    ( my $file = "$module.pm" ) =~ s{::}{/}g;
    if ( !eval { require $file; 1 } ) {
        die "No application given.  Serving the current directory by default needs $module "
          . "(PAGI-Tools), which is not installed; install it, or name an application "
          . "(an app file, a module, --app FILE or -e CODE).\n"
          if $@ =~ /^Can't locate \Q$file\E/;
        die "Cannot load $module (serving the current directory, as no application was given): $@";
    }
    return _load_module( $module, { root => '.', %$args } );
}

sub _load_module {
    my ( $module, $args ) = @_;
    _check_module_name($module);
    ( my $file = "$module.pm" ) =~ s{::}{/}g;
    eval { require $file; 1 } or die "Cannot find module '$module': $@";
    die "Module '$module' does not have a new() method\n" unless $module->can('new');
    my $obj = eval { $module->new(%$args) };
    die "Error constructing module '$module': $@" if $@;
    return _normalize( $obj, "Module '$module' constructor" );
}

# A coderef (even a blessed one) is the app; a provider object has to_app
# called exactly once (Spec.pod, "Application Providers and Loading").
sub _normalize {
    my ( $value, $source ) = @_;
    return $value if ref $value && reftype($value) eq 'CODE';
    if ( blessed $value ) {
        die "$source returned an application-provider object without to_app()\n"
          unless $value->can('to_app');
        my $app = eval { $value->to_app };
        die "Error normalizing $source through to_app(): $@" if $@;
        die "$source to_app() must return a coderef, got: " . _describe($app) . "\n"
          unless ref $app && reftype($app) eq 'CODE';
        return $app;
    }
    die "$source must be a coderef or instantiated application-provider object, got: "
      . _describe($value) . "\n";
}

sub _describe {
    my ($v) = @_;
    return 'undef' unless defined $v;
    return ref $v || 'non-reference';
}

1;
