# Writes over the disk (which -snapshot must keep unchanged on the host).
. /tests/common.sh
wait_dev vda
pattern /tmp/p '\132'
write_read vda /tmp/p 1
