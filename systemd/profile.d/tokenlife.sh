# tokenlife: /etc/profile.d/tokenlife.sh on login nodes (sh, bash, zsh, ksh).
# Tells programs where the user's token is: the login token file that
# 'tokenlife pam' wrote at login and the daemon keeps renewed. SLURM_JWT itself
# is not exported: with it set, every Slurm command here would use JWT only
# (srun and sstat would fail: slurmd accepts munge only), and a variable goes
# stale while the file does not. To use the token:
#   SLURM_JWT=$(tokenlife-engine token) squeue      # one command
#   tokenlife-engine exec -- my-rest-client         # the same, for any program
# REST clients may read "$SLURM_JWT_FILE" before each request.
# Edit TOKENLIFE_LOGIN_DIR if [login] token_dir is not /run/tokenlife.
TOKENLIFE_LOGIN_DIR=/run/tokenlife
if [ -z "${SLURM_JWT_FILE:-}" ]; then
    _tokenlife_file="$TOKENLIFE_LOGIN_DIR/$(id -u)/slurm_jwt"
    if [ -f "$_tokenlife_file" ]; then
        SLURM_JWT_FILE=$_tokenlife_file
        export SLURM_JWT_FILE
    fi
    unset _tokenlife_file
fi
unset TOKENLIFE_LOGIN_DIR
