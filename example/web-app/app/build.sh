#!/bin/sh
# Build the web app for one machine, as seed 001's npm build does: flakefleet's build stage has
# copied this app, the machine's .env and its images into a fresh build directory; the result
# is dist/, which flakefleet ships as /var/src/web-app-dist.
set -eu
. ./.env
: "${SITE_NAME:?.env must set SITE_NAME}" "${TAGLINE:=}" "${ACCENT:=#333}"
mkdir -p dist/images
sed -e "s|@SITE_NAME@|$SITE_NAME|g" -e "s|@TAGLINE@|$TAGLINE|g" index.html > dist/index.html
sed -e "s|@ACCENT@|$ACCENT|g" style.css > dist/style.css
cp images/* dist/images/
echo "built dist/ for $SITE_NAME"
