#!/bin/sh
# The secrets-check service of docker-compose.yml, on which every service that uses a secret waits:
# `docker compose up` goes no further while a secret of .env is unset, still holds the placeholder
# of .env.example, or is shorter than 16 characters.
#
#   check-secrets.sh SECRET... [--names NAME...]
#
# Each SECRET and NAME is the name of an environment variable. A SECRET must be set, must not
# contain the placeholder and must be 16 characters or more (counted in bytes); a NAME (a user
# name, not a secret) must be set and must not contain the placeholder. One line per bad
# variable, naming it, goes to stderr, and the exit status is 1; no value is ever printed (nor
# the placeholder, which may be one).
# POSIX sh only: it runs in any image with a /bin/sh.

PLACEHOLDER=change-me
MIN_LENGTH=16

bad=0
checked=0
kind=secret

complain() {
    printf 'secrets-check: %s\n' "$1" >&2
    bad=1
}

if [ "$#" -eq 0 ]; then
    complain "no variable to check (usage: check-secrets.sh SECRET... [--names NAME...])"
fi

for name in "$@"; do
    if [ "$name" = --names ]; then
        kind=name
        continue
    fi
    case $name in
        ''|[0-9]*|*[!A-Za-z0-9_]*)
            complain "not a variable name: '$name'"
            continue ;;
    esac
    checked=$((checked + 1))
    # Indirection through eval, safe now that $name is a plain identifier.
    eval "is_set=\${$name+set} value=\${$name-}"
    if [ "$is_set" != set ] || [ -z "$value" ]; then
        complain "$name is not set: set it in .env"
        continue
    fi
    case $value in
        *"$PLACEHOLDER"*)
            complain "$name still holds the placeholder of .env.example: replace it in .env"
            continue ;;
    esac
    if [ "$kind" = secret ] && [ "${#value}" -lt "$MIN_LENGTH" ]; then
        complain "$name is shorter than $MIN_LENGTH characters: set a longer one in .env (openssl rand -hex 32)"
    fi
done
value=

if [ "$bad" -ne 0 ]; then
    printf 'secrets-check: refusing to start; fix .env and run docker compose up again\n' >&2
    exit 1
fi
printf 'secrets-check: %s variables checked\n' "$checked"
